"""``hvobs serve``: the live web view and the HTTP query API (Starlette on uvicorn).

* ``views``: what the view shows, derived from the events (agents, sagas, spawn trees);
* ``runtime``: the bus, the view and the stream broadcaster of one server;
* ``app``: the Starlette application (page, JSON API, stream) and its security checks;
* ``openapi``: the OpenAPI document; ``params``: parameter validation; ``stream``: the
  server-sent events; ``encode``: bounded JSON of events; ``server``: the uvicorn server;
* ``cli``: the ``hvobs serve`` command; ``static/``: the page (HTML, CSS, JavaScript).

Importing this package loads neither Starlette nor uvicorn; its modules do.
"""
