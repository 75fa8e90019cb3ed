"""Small helpers shared by every layer: the async-context-manager mixin (``aio``) and the lazy
re-exports of package ``__init__`` modules (``lazy``)."""
