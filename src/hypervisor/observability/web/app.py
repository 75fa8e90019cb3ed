"""The Starlette application of ``hvobs serve``: the page, the JSON API and the stream.

``create_app(runtime)`` serves:

* ``/`` and ``/static/*``: the page (plain HTML, CSS and JavaScript shipped as package data);
* ``/openapi.json``: the OpenAPI document (:mod:`~hypervisor.observability.web.openapi`);
* ``/api/...``: events by cursor pages, agents, sagas, spawn trees, status, and the stream.

Security: with a token, every ``/api`` request needs ``Authorization: Bearer <token>``
(compared in constant time; the token is never logged). A server bound to a loopback address
answers only requests whose ``Host`` is a loopback name, so a web page elsewhere cannot reach
it through DNS rebinding. The page is sent with a strict content security policy (its own
script and style only).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from importlib import resources
from typing import Any, Final

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypervisor.observability._core.spans import SagaSpanRecord
from hypervisor.observability.errors import BadRequestError
from hypervisor.observability.web.encode import encode_events, encode_json, join_array
from hypervisor.observability.web.openapi import (
    MAX_AGENT_LIMIT,
    MAX_SAGA_LIMIT,
    MAX_TRACE_LIMIT,
    openapi_document,
)
from hypervisor.observability.web.params import (
    DEFAULT_EVENT_LIMIT,
    MAX_EVENT_LIMIT,
    QueryArgs,
    check_path_id,
    check_trace_id,
    parse_position,
)
from hypervisor.observability.web.runtime import ServeRuntime
from hypervisor.observability.web.views import SAGA_STATES, SagaEntry, TraceTree

__all__ = ["LOOPBACK_NAMES", "create_app"]

_log = logging.getLogger("hypervisor.observability.web")

LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_PAGE_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Span attribute values come from payloads: a long one is cut in responses.
_MAX_ATTRIBUTE: Final = 512
_STATIC: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}


class _Json(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else encode_json(content)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _Json({"error": message}, status_code=status, headers=headers)


def _span_kind(name: str) -> str:
    if name.startswith("saga.step."):
        return "step"
    if name.startswith("saga.compensate."):
        return "compensation"
    return "saga"


def _span_dict(record: SagaSpanRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "kind": _span_kind(record.name),
        "step_id": record.step_id,
        "step_action": record.step_action,
        "status": record.status,
        "start_time": record.start_time,
        "end_time": record.end_time,
        "duration_seconds": record.end_time - record.start_time,
        "trace_id": record.trace_id,
        "span_id": record.span_id,
        "parent_span_id": record.parent_span_id,
        "attributes": {
            key: value[:_MAX_ATTRIBUTE] if isinstance(value, str) else value
            for key, value in record.attributes.items()
        },
    }


def _saga_dict(entry: SagaEntry) -> dict[str, Any]:
    spans = [_span_dict(record) for record in entry.spans]
    for step_key, (start, action) in entry.running.items():
        spans.append(
            {
                "name": f"saga.step.{action or step_key}",
                "kind": "step",
                "step_id": step_key,
                "step_action": action,
                "status": "running",
                "start_time": start,
                "end_time": None,
                "duration_seconds": None,
                "trace_id": None,
                "span_id": None,
                "parent_span_id": None,
                "attributes": {},
            }
        )
    spans.sort(key=lambda span: (span["kind"] == "saga", span["start_time"]))
    return {
        "saga_id": entry.saga_id,
        "state": entry.state,
        "started_at": entry.started_at,
        "ended_at": entry.ended_at,
        "agent_did": entry.agent_did,
        "session_id": entry.session_id,
        "trace_id": entry.trace_id,
        "failed_steps": entry.failed_steps,
        "compensations": entry.compensations,
        "dropped_spans": entry.dropped_spans,
        "spans": spans,
    }


def _trace_summary(tree: TraceTree) -> dict[str, Any]:
    return {
        "trace_id": tree.trace_id,
        "nodes": len(tree.nodes),
        "last_seen": tree.last_seen,
        "dropped_nodes": tree.dropped_nodes,
    }


class _Api:
    """The request handlers, bound to one runtime."""

    def __init__(self, runtime: ServeRuntime, token: bool) -> None:
        self.runtime = runtime
        self.bus = runtime.bus
        self.view = runtime.view
        self.broadcaster = runtime.broadcaster
        self.settings = runtime.settings
        self.openapi = encode_json(openapi_document(token=token))
        package = resources.files("hypervisor.observability.web") / "static"
        self.page = (package / "index.html").read_bytes()
        self.static = {name: (package / name).read_bytes() for name in _STATIC}

    async def index(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self.static.get(name)
        if body is None:
            return _error(404, f"no static file {name[:80]!r}")
        return Response(body, media_type=_STATIC[name], headers=_PAGE_HEADERS)

    async def openapi_json(self, request: Request) -> Response:
        return _Json(self.openapi)

    async def events(self, request: Request) -> Response:
        args = QueryArgs(request.query_params.multi_items())
        event_type = args.event_type()
        session_id = args.text("session_id")
        agent_did = args.text("agent_did")
        since = args.date_time("since")
        until = args.date_time("until")
        limit = args.integer(
            "limit", default=DEFAULT_EVENT_LIMIT, minimum=1, maximum=MAX_EVENT_LIMIT
        )
        cursor = args.position("cursor")
        before = None
        if cursor is not None:
            if cursor.run != self.runtime.run_id:
                # Well formed but stale: a conflict with the server's state, not a bad request.
                return _error(
                    409,
                    "cursor: it belongs to another run of this server (positions restarted); "
                    "ask again without a cursor",
                )
            before = cursor.position
        # Read before the page, in the same step: every event after the page is newer.
        stream_id = self.broadcaster.stream_id(self.bus.index_position)
        page = await self.bus.query_page(
            event_type, session_id, agent_did, since, until, before, limit
        )
        parts = encode_events(page.events, self.settings.max_event_bytes)
        next_before = page.next_before
        # Bounded body: keep the newest events that fit; the rest is the next page.
        budget = self.settings.max_response_bytes
        keep = 0
        for part in reversed(parts):
            if keep and budget - len(part) < 0:
                break
            budget -= len(part) + 1
            keep += 1
        if keep < len(parts):
            cut = len(parts) - keep
            next_before = page.positions[cut]
            parts = parts[cut:]
        next_cursor = None if next_before is None else self.broadcaster.stream_id(next_before)
        body = b"".join(
            (
                b'{"events":',
                join_array(parts),
                b',"next_cursor":',
                encode_json(next_cursor),
                b',"stream_id":',
                encode_json(stream_id),
                b"}",
            )
        )
        return _Json(body)

    async def agents(self, request: Request) -> Response:
        args = QueryArgs(request.query_params.multi_items())
        elevated = args.boolean("elevated")
        breached = args.boolean("breached")
        limit = args.integer("limit", default=500, minimum=1, maximum=MAX_AGENT_LIMIT)
        agents, total = self.view.agents(elevated=elevated, breached=breached, limit=limit)
        return _Json({"agents": agents, "total": total})

    async def sagas(self, request: Request) -> Response:
        args = QueryArgs(request.query_params.multi_items())
        state = args.choice("state", SAGA_STATES)
        agent_did = args.text("agent_did")
        limit = args.integer("limit", default=20, minimum=1, maximum=MAX_SAGA_LIMIT)
        sagas, total = self.view.sagas(state=state, agent_did=agent_did, limit=limit)
        return _Json({"sagas": [_saga_dict(entry) for entry in sagas], "total": total})

    async def saga(self, request: Request) -> Response:
        saga_id = check_path_id("saga_id", request.path_params["saga_id"])
        entry = self.view.saga(saga_id)
        if entry is None:
            return _error(404, f"no saga {saga_id[:80]!r} (never seen, or no longer kept)")
        return _Json(_saga_dict(entry))

    async def traces(self, request: Request) -> Response:
        args = QueryArgs(request.query_params.multi_items())
        limit = args.integer("limit", default=100, minimum=1, maximum=MAX_TRACE_LIMIT)
        trees, total = self.view.traces(limit)
        return _Json({"traces": [_trace_summary(tree) for tree in trees], "total": total})

    async def trace(self, request: Request) -> Response:
        trace_id = check_trace_id(request.path_params["trace_id"])
        tree = self.view.trace(trace_id)
        if tree is None:
            return _error(404, f"no trace {trace_id!r} (never seen, or no longer kept)")
        return _Json({**_trace_summary(tree), "nodes": self.view.tree_nodes(tree)})

    async def status(self, request: Request) -> Response:
        bus = self.bus
        view = self.view
        broadcaster = self.broadcaster
        stale = bus.reader_stale_s
        return _Json(
            {
                "source": self.runtime.source,
                "events_indexed": await bus.event_count(),
                "max_events": bus.max_events,
                "index_position": bus.index_position,
                "evicted_events": bus.evicted_count,
                "decode_errors": bus.decode_errors,
                # While the bus cannot read its log, the index (and everything served from it)
                # is the last one read: say for how long.
                "reader_errors": bus.reader_errors,
                "stale_seconds": None if stale is None else round(stale, 3),
                "stream_clients": len(broadcaster.clients),
                "stream_messages": broadcaster.messages_sent,
                "stream_dropped_events": broadcaster.dropped_events,
                "view": {
                    "events_applied": view.events_applied,
                    "agents": view.agent_count,
                    "sagas": view.saga_count,
                    "traces": view.trace_count,
                    "evicted_agents": view.evicted_agents,
                    "evicted_sagas": view.evicted_sagas,
                    "evicted_traces": view.evicted_traces,
                    "bad_trace_ids": view.bad_trace_ids,
                },
            }
        )

    async def stream(self, request: Request) -> Response:
        args = QueryArgs(request.query_params.multi_items())
        header = request.headers.getlist("last-event-id")
        if len(header) > 1:
            raise BadRequestError("Last-Event-ID: given more than once")
        resume = (
            parse_position("Last-Event-ID", header[0]) if header else args.position("last_event_id")
        )
        try:
            messages = self.broadcaster.connect(resume)
        except OverflowError as exc:
            return _error(503, str(exc), {"Retry-After": "5"})
        return StreamingResponse(
            messages,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


class _Guard:
    """Pure ASGI middleware: the loopback ``Host`` check and the bearer token on ``/api``."""

    def __init__(self, app: ASGIApp, token: str | None, allowed_hosts: Iterable[str] | None):
        self.app = app
        self.expected = None if token is None else f"Bearer {token}".encode()
        self.allowed_hosts = None if allowed_hosts is None else frozenset(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = authorization = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"authorization":
                authorization = value
        if (
            self.allowed_hosts is not None
            and host is not None
            and _host_name(host) not in self.allowed_hosts
        ):
            await _reply(send, 400, {"error": "unexpected Host header for a loopback server"})
            return
        if self.expected is not None and scope["path"].startswith("/api/"):
            given = authorization or b""
            if not hmac.compare_digest(given, self.expected):
                await _reply(
                    send,
                    401,
                    {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                    [(b"www-authenticate", b'Bearer realm="hvobs"')],
                )
                return
        await self.app(scope, receive, send)


def _host_name(host: bytes) -> str:
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


async def _reply(
    send: Send,
    status: int,
    body: dict[str, str],
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> None:
    data = encode_json(body)
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            *headers,
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": data})


async def _bad_request(request: Request, exc: Exception) -> Response:
    return _error(400, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error (logged by the server)")


def create_app(
    runtime: ServeRuntime,
    *,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
) -> ASGIApp:
    """The ASGI application over a started (or starting) ``runtime``.

    Args:
        runtime: the bus, view and broadcaster to serve.
        token: the bearer token every ``/api`` request must carry; ``None`` for none.
        allowed_hosts: the ``Host`` names accepted (``None``: any); a loopback server passes
            :data:`LOOPBACK_NAMES`.
    """
    api = _Api(runtime, token is not None)
    routes = [
        Route("/", api.index),
        Route("/static/{name}", api.static_file),
        Route("/openapi.json", api.openapi_json),
        Route("/api/events", api.events),
        Route("/api/agents", api.agents),
        Route("/api/sagas", api.sagas),
        Route("/api/sagas/{saga_id:path}", api.saga),
        Route("/api/traces", api.traces),
        Route("/api/traces/{trace_id:path}", api.trace),
        Route("/api/status", api.status),
        Route("/api/stream", api.stream),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            BadRequestError: _bad_request,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
    return _Guard(app, token, allowed_hosts)
