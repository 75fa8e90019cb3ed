"""The OpenAPI 3.1 document of ``hvobs serve``, written by hand to match the handlers.

The parameter limits come from :mod:`~hypervisor.observability.web.params` (the same constants
the handlers enforce), and every operation that takes parameters documents its 400 answer.
"""

from __future__ import annotations

from typing import Any, Final

from hypervisor.observability.web.params import (
    EVENT_TYPES,
    MAX_EVENT_LIMIT,
    MAX_ID_LENGTH,
    POSITION_PATTERN,
    TRACE_ID_PATTERN,
)
from hypervisor.observability.web.views import SAGA_STATES

__all__ = [
    "MAX_AGENT_LIMIT",
    "MAX_SAGA_LIMIT",
    "MAX_TRACE_LIMIT",
    "openapi_document",
]

MAX_AGENT_LIMIT: Final = 5000
MAX_SAGA_LIMIT: Final = 100
MAX_TRACE_LIMIT: Final = 1000

_NULLABLE_STRING: Final = {"type": ["string", "null"]}
_NULLABLE_NUMBER: Final = {"type": ["number", "null"]}
_ID: Final = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR: Final = _ref("Error")


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "a parameter is malformed or out of range (the message says which and why)",
        401: "the bearer token is missing or wrong (only when the server has a token)",
        404: "unknown id (never seen, or no longer kept)",
        409: "the cursor belongs to another run of the server: ask again without it",
        503: "too many stream clients are connected",
    }
    return {str(status): _json(_ERROR, text[status]) for status in statuses}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _limit(default: int, maximum: int, what: str) -> dict[str, Any]:
    return _query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": maximum, "default": default},
        f"the most {what} returned",
    )


_EVENT_SCHEMA: Final = {
    "type": "object",
    "description": "An event, in the shape of HypervisorEvent.to_dict().",
    "required": [
        "event_id",
        "event_type",
        "timestamp",
        "session_id",
        "agent_did",
        "causal_trace_id",
        "parent_event_id",
        "payload",
    ],
    "properties": {
        "event_id": {"type": "string"},
        "event_type": {"type": "string", "enum": list(EVENT_TYPES)},
        "timestamp": {"type": "string", "description": "ISO 8601 (datetime.isoformat())"},
        "session_id": _NULLABLE_STRING,
        "agent_did": _NULLABLE_STRING,
        "causal_trace_id": _NULLABLE_STRING,
        "parent_event_id": _NULLABLE_STRING,
        "payload": {
            "type": "object",
            "description": (
                "As emitted; replaced by {hvobs_truncated: bytes} when the event's JSON is "
                "longer than the server's per-event limit."
            ),
        },
    },
}

_SPAN_SCHEMA: Final = {
    "type": "object",
    "required": [
        "name",
        "kind",
        "step_id",
        "step_action",
        "status",
        "start_time",
        "end_time",
        "duration_seconds",
        "trace_id",
        "span_id",
        "parent_span_id",
        "attributes",
    ],
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["saga", "step", "compensation"]},
        "step_id": {"type": "string"},
        "step_action": {"type": "string"},
        "status": {
            "type": "string",
            "enum": ["ok", "error", "compensating", "running"],
            "description": "error marks a failed step (or an escalated saga)",
        },
        "start_time": {"type": "number", "description": "epoch seconds"},
        "end_time": {"type": ["number", "null"], "description": "null while running"},
        "duration_seconds": {"type": ["number", "null"]},
        "trace_id": {"type": ["string", "null"]},
        "span_id": {"type": ["string", "null"]},
        "parent_span_id": _NULLABLE_STRING,
        "attributes": {"type": "object"},
    },
}

_SAGA_SCHEMA: Final = {
    "type": "object",
    "required": [
        "saga_id",
        "state",
        "started_at",
        "ended_at",
        "agent_did",
        "session_id",
        "trace_id",
        "failed_steps",
        "compensations",
        "dropped_spans",
        "spans",
    ],
    "properties": {
        "saga_id": {"type": "string"},
        "state": {"type": "string", "enum": list(SAGA_STATES)},
        "started_at": {"type": "number", "description": "epoch seconds"},
        "ended_at": _NULLABLE_NUMBER,
        "agent_did": _NULLABLE_STRING,
        "session_id": _NULLABLE_STRING,
        "trace_id": {
            "type": ["string", "null"],
            "description": "the first segment of its causal trace id (see /api/traces)",
        },
        "failed_steps": {"type": "integer"},
        "compensations": {"type": "integer"},
        "dropped_spans": {"type": "integer"},
        "spans": {"type": "array", "items": _ref("Span")},
    },
}

_AGENT_SCHEMA: Final = {
    "type": "object",
    "required": [
        "agent_did",
        "ring",
        "elevated",
        "elevated_since",
        "elevated_seconds",
        "last_elevation_seconds",
        "breaches",
        "events",
        "first_seen",
        "last_seen",
        "session_id",
        "trace_id",
        "span_id",
    ],
    "properties": {
        "agent_did": {"type": "string"},
        "ring": {"type": ["integer", "null"], "description": "current ring (0 is the root ring)"},
        "elevated": {"type": "boolean"},
        "elevated_since": {"type": ["number", "null"], "description": "epoch seconds"},
        "elevated_seconds": {
            "type": ["number", "null"],
            "description": "open elevation so far, in event time",
        },
        "last_elevation_seconds": _NULLABLE_NUMBER,
        "breaches": {"type": "integer"},
        "events": {"type": "integer"},
        "first_seen": {"type": "number"},
        "last_seen": {"type": "number"},
        "session_id": _NULLABLE_STRING,
        "trace_id": _NULLABLE_STRING,
        "span_id": _NULLABLE_STRING,
    },
}

_NODE_SCHEMA: Final = {
    "type": "object",
    "required": [
        "span_id",
        "parent_span_id",
        "depth",
        "agent_did",
        "ring",
        "elevated",
        "breaches",
        "first_seen",
        "events",
    ],
    "properties": {
        "span_id": {"type": "string"},
        "parent_span_id": _NULLABLE_STRING,
        "depth": {"type": "integer", "minimum": 0},
        "agent_did": _NULLABLE_STRING,
        "ring": {"type": ["integer", "null"]},
        "elevated": {"type": "boolean"},
        "breaches": {"type": "integer"},
        "first_seen": {"type": "number"},
        "events": {"type": "integer"},
    },
}

_TRACE_SUMMARY_SCHEMA: Final = {
    "type": "object",
    "required": ["trace_id", "nodes", "last_seen", "dropped_nodes"],
    "properties": {
        "trace_id": {"type": "string"},
        "nodes": {"type": "integer"},
        "last_seen": {"type": "number"},
        "dropped_nodes": {"type": "integer"},
    },
}

_TRACE_SCHEMA: Final = {
    "type": "object",
    "required": ["trace_id", "last_seen", "dropped_nodes", "nodes"],
    "properties": {
        "trace_id": {"type": "string"},
        "last_seen": {"type": "number"},
        "dropped_nodes": {"type": "integer"},
        "nodes": {
            "type": "array",
            "description": "parents before children; depth 0 for the roots",
            "items": _ref("TraceNode"),
        },
    },
}

_EVENT_PAGE_SCHEMA: Final = {
    "type": "object",
    "required": ["events", "next_cursor", "stream_id"],
    "properties": {
        "events": {"type": "array", "items": _ref("Event"), "description": "oldest first"},
        "next_cursor": {
            "type": ["string", "null"],
            "description": "pass as cursor for the next, older page; null when none is older",
        },
        "stream_id": {
            "type": "string",
            "description": (
                "the index position when the page was read: pass it as last_event_id to "
                "/api/stream to get every newer event exactly once"
            ),
        },
    },
}

_STATUS_SCHEMA: Final = {
    "type": "object",
    "required": ["source", "events_indexed", "max_events", "stream_clients", "view"],
    "properties": {
        "source": {"type": "string"},
        "events_indexed": {"type": "integer"},
        "max_events": {"type": ["integer", "null"]},
        "index_position": {"type": "integer"},
        "stream_clients": {"type": "integer"},
        "stream_dropped_events": {"type": "integer"},
        "reader_errors": {"type": "integer"},
        "stale_seconds": {
            "type": ["number", "null"],
            "description": "seconds the bus has failed to read its log (null while it reads)",
        },
        "view": {"type": "object"},
    },
}


def openapi_document(*, token: bool) -> dict[str, Any]:
    """The OpenAPI document; ``token`` adds the bearer scheme to the ``/api`` operations."""
    api_errors = (400, 401) if token else (400,)
    by_id_errors = (400, 401, 404) if token else (400, 404)
    security: dict[str, Any] = {"security": [{"bearer": []}]} if token else {}
    events_params = [
        _query("event_type", {"type": "string", "enum": list(EVENT_TYPES)}, "wire value"),
        _query("session_id", _ID, "keep only this session"),
        _query("agent_did", _ID, "keep only this agent"),
        _query(
            "since",
            {"type": "string", "format": "date-time"},
            "keep only events at or after this RFC 3339 date-time (with an offset, Z for UTC)",
        ),
        _query("until", {"type": "string", "format": "date-time"}, "at or before (inclusive)"),
        _limit(100, MAX_EVENT_LIMIT, "events"),
        _query(
            "cursor",
            {"type": "string", "pattern": POSITION_PATTERN},
            (
                "next_cursor of the previous page: the page then holds the matches older than "
                "that page's oldest event. Stable while events are appended (they are newer "
                "than every cursor) and evicted (they are no longer returned); a cursor of an "
                "earlier server run is refused with 409."
            ),
        ),
    ]
    operations: dict[str, Any] = {
        "/api/events": {
            "get": {
                "operationId": "listEvents",
                "summary": "Indexed events matching every filter: the newest page, oldest first",
                "parameters": events_params,
                "responses": {
                    "200": _json(_ref("EventPage"), "one page"),
                    **_errors(*api_errors, 409),
                },
                **security,
            }
        },
        "/api/agents": {
            "get": {
                "operationId": "listAgents",
                "summary": "Agents with their current ring, elevation and breaches",
                "parameters": [
                    _query("elevated", {"type": "boolean"}, "only (not) elevated agents"),
                    _query("breached", {"type": "boolean"}, "only agents with(out) breaches"),
                    _limit(500, MAX_AGENT_LIMIT, "agents"),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["agents", "total"],
                            "properties": {
                                "agents": {
                                    "type": "array",
                                    "items": _ref("Agent"),
                                    "description": "most recently seen first",
                                },
                                "total": {"type": "integer"},
                            },
                        },
                        "the agents",
                    ),
                    **_errors(*api_errors),
                },
                **security,
            }
        },
        "/api/sagas": {
            "get": {
                "operationId": "listSagas",
                "summary": "Sagas with their spans (steps and compensations), newest first",
                "parameters": [
                    _query("state", {"type": "string", "enum": list(SAGA_STATES)}, "saga state"),
                    _query("agent_did", _ID, "sagas of this agent"),
                    _limit(20, MAX_SAGA_LIMIT, "sagas"),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["sagas", "total"],
                            "properties": {
                                "sagas": {"type": "array", "items": _ref("Saga")},
                                "total": {"type": "integer"},
                            },
                        },
                        "the sagas",
                    ),
                    **_errors(*api_errors),
                },
                **security,
            }
        },
        "/api/sagas/{saga_id}": {
            "get": {
                "operationId": "getSaga",
                "summary": "One saga with its spans",
                "parameters": [
                    {"name": "saga_id", "in": "path", "required": True, "schema": _ID},
                ],
                "responses": {"200": _json(_ref("Saga"), "the saga"), **_errors(*by_id_errors)},
                **security,
            }
        },
        "/api/traces": {
            "get": {
                "operationId": "listTraces",
                "summary": "Causal traces (spawn trees) seen, most recently active first",
                "parameters": [_limit(100, MAX_TRACE_LIMIT, "traces")],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["traces", "total"],
                            "properties": {
                                "traces": {"type": "array", "items": _ref("TraceSummary")},
                                "total": {"type": "integer"},
                            },
                        },
                        "the traces",
                    ),
                    **_errors(*api_errors),
                },
                **security,
            }
        },
        "/api/traces/{trace_id}": {
            "get": {
                "operationId": "getTrace",
                "summary": "The causal spawn tree of a trace, with each agent's ring",
                "parameters": [
                    {
                        "name": "trace_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": TRACE_ID_PATTERN},
                        "description": (
                            "the causal trace id's first segment: a1b2c3d4e5f6 of "
                            "a1b2c3d4e5f6/01234567"
                        ),
                    },
                ],
                "responses": {
                    "200": _json(_ref("Trace"), "the tree"),
                    **_errors(*by_id_errors),
                },
                **security,
            }
        },
        "/api/stream": {
            "get": {
                "operationId": "streamEvents",
                "summary": "Server-sent events of new events, batched per tick",
                "description": (
                    "Messages: `events` (data: a JSON array of events, oldest first; id: the "
                    "stream position after them), `reset` (data: {reason, dropped}: events "
                    "were missed, reload the views; id: the live position), and comment "
                    "heartbeats. Reconnect with the Last-Event-ID header (or last_event_id) to "
                    "resume exactly after the last message received."
                ),
                "parameters": [
                    _query(
                        "last_event_id",
                        {"type": "string", "pattern": POSITION_PATTERN},
                        "resume after this id (the Last-Event-ID header wins when both are given)",
                    ),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": POSITION_PATTERN},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "an endless text/event-stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(*api_errors, 503),
                },
                **security,
            }
        },
        "/api/status": {
            "get": {
                "operationId": "getStatus",
                "summary": "The server's source, index and stream counters",
                "responses": {
                    "200": _json(_ref("Status"), "the status"),
                    **(_errors(401) if token else {}),
                },
                **security,
            }
        },
        "/": {
            "get": {
                "operationId": "page",
                "summary": "The live view (one static page)",
                "responses": {
                    "200": {
                        "description": "the page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "hvobs serve",
            "version": "1",
            "description": (
                "Live view and query API over an agent fleet's events: the events of the "
                "local index, agents with their rings, sagas with their spans, causal spawn "
                "trees. Every response is bounded; bad parameters get 400 with a message."
            ),
        },
        "paths": operations,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "Event": _EVENT_SCHEMA,
                "EventPage": _EVENT_PAGE_SCHEMA,
                "Agent": _AGENT_SCHEMA,
                "Span": _SPAN_SCHEMA,
                "Saga": _SAGA_SCHEMA,
                "TraceNode": _NODE_SCHEMA,
                "TraceSummary": _TRACE_SUMMARY_SCHEMA,
                "Trace": _TRACE_SCHEMA,
                "Status": _STATUS_SCHEMA,
            },
        },
    }
    if token:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
