"""OpenTelemetry export (the ``otel`` extra): saga spans as real spans, ring metrics as instruments.

:class:`OTelSpanSink` turns :class:`~hypervisor.observability.SagaSpanRecord` objects into
OpenTelemetry SDK spans that carry the record's own identity and timing:

* start and end times are the record's (event time), not the time of export;
* the trace id and span id are the record's ``trace_id`` / ``span_id`` (derived from the saga's
  causal trace id), and the parent is ``parent_span_id``, so a saga's step spans are children of
  its saga span and share its trace id in any tracing backend;
* status: ``ok`` becomes ``OK``, ``error`` becomes ``ERROR`` with the step's error (or reason) as
  description, ``compensating`` stays ``UNSET`` with ``agent.saga.compensating=true``.

How the ids get in. The SDK's tracer asks its provider's ``IdGenerator`` for new ids, and a
random generator cannot return ours. Spans go through the tracer all the same, so the provider's
processors, sampler, resource and exporters (OTLP, console, ...) apply unchanged; the sink
installs a :class:`RecordIdGenerator` on the provider, which hands out the ids of the record being
converted and otherwise delegates to the generator it replaced, so other tracers of the same
provider keep getting random ids. (Building ``ReadableSpan`` objects by hand and calling an
exporter directly would bypass the provider's processors and batching, and its span limits.)

:class:`OTelRingMetricsBridge` reports the ring metrics through an OpenTelemetry meter with
observable instruments read at collection time, under the same names as the Prometheus series.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol, Self

from opentelemetry import trace as trace_api
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from hypervisor.observability._core.agent_spans import AgentSpanRecord, SpanEventRecord
from hypervisor.observability._core.ring import (
    METRIC_RING_BREACHES_TOTAL,
    METRIC_RING_CURRENT,
    METRIC_RING_ELEVATION_DURATION,
    METRIC_RING_TRANSITIONS_TOTAL,
    RingMetricsState,
)
from hypervisor.observability._core.spans import SagaSpanRecord
from hypervisor.observability._core.trace_context import TraceContext
from hypervisor.observability.exporters.prometheus import (
    DEFAULT_MAX_AGENTS,
    DEFAULT_MAX_SESSIONS,
    LabelGuard,
)

__all__ = [
    "INSTRUMENTATION_SCOPE",
    "OTelRingMetricsBridge",
    "OTelSpanSink",
    "RecordIdGenerator",
    "otlp_http_span_sink",
]

INSTRUMENTATION_SCOPE: Final = "hypervisor.observability"
"""The instrumentation scope (tracer and meter name) of the spans and instruments made here."""

_STATUS_COMPENSATING: Final = "agent.saga.compensating"
_ATTRIBUTE_TYPES: Final = (str, bool, int, float)
_MAX_CACHED_LINKS: Final = 4096


class RecordIdGenerator(IdGenerator):
    """Hands out pre-set ids for the span being started, else delegates to ``fallback``.

    :meth:`set_next` stores a trace id and a span id for the calling thread; the tracer's next
    ``generate_trace_id`` / ``generate_span_id`` calls on that thread return them (once each).

    Args:
        fallback: the generator used when no id is pending (random by default).
    """

    def __init__(self, fallback: IdGenerator | None = None) -> None:
        self.fallback = fallback if fallback is not None else RandomIdGenerator()
        self._pending = threading.local()

    def set_next(self, trace_id: int | None, span_id: int | None) -> None:
        """Make the next id requests of this thread return these values (``None``: fallback)."""
        self._pending.trace_id = trace_id
        self._pending.span_id = span_id

    def clear(self) -> None:
        """Drop ids set by :meth:`set_next` and not used."""
        self._pending.trace_id = None
        self._pending.span_id = None

    def generate_span_id(self) -> int:
        """Return the pending span id, else a fallback one."""
        span_id: int | None = getattr(self._pending, "span_id", None)
        if span_id is None:
            return self.fallback.generate_span_id()
        self._pending.span_id = None
        return span_id

    def generate_trace_id(self) -> int:
        """Return the pending trace id, else a fallback one."""
        trace_id: int | None = getattr(self._pending, "trace_id", None)
        if trace_id is None:
            return self.fallback.generate_trace_id()
        self._pending.trace_id = None
        return trace_id

    def is_trace_id_random(self) -> bool:
        """Record trace ids are hashes, not guaranteed uniformly random: report False."""
        return False


def _attribute_value(value: object) -> str | bool | int | float:
    if isinstance(value, _ATTRIBUTE_TYPES):
        return value
    return str(value)


def _ns(seconds: float) -> int:
    # Whole and fractional seconds apart: ``seconds * 1e9`` near 1.7e18 is only good to 256 ns.
    whole = math.floor(seconds)
    return whole * 1_000_000_000 + round((seconds - whole) * 1e9)


class OTelSpanSink:
    """A span sink (``record_span`` and ``export_span``) that makes OpenTelemetry spans.

    Attach it to a :class:`~hypervisor.observability.SagaSpanExporter` (``sink=`` or
    ``attach_sink``), or to the saga-span worker. Records with ids (``export_span``) keep their
    trace, span and parent ids; plain ``record_span`` calls (no ids) become root spans with fresh
    random ids. Both keep the true start and end times. Agent spans of the spawn tree
    (``export_agent_span``, from ``AgentSpanExporter`` or the ``agent-spans`` worker) keep their
    ids too, with their span events (ring transitions, breaches, spawned children) at their event
    times. A record's ``links`` (the producers' span contexts) become span links, which the
    provider's span limits cap (128 by default).

    Args:
        tracer_provider: the SDK ``TracerProvider`` to create spans with. The sink installs a
            :class:`RecordIdGenerator` on it (delegating to its current generator). When
            ``None``, the sink makes its own provider (resource ``service.name`` =
            ``service_name``) and owns it: :meth:`shutdown` shuts it down.
        span_exporter: with the sink's own provider, where spans are exported.
        service_name: ``service.name`` of the sink's own provider.
        batch: with ``span_exporter``, export in the background in batches (``True``) or
            synchronously on every span (``False``).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        span_exporter: SpanExporter | None = None,
        service_name: str = "agent-hypervisor",
        batch: bool = True,
    ) -> None:
        self._owns_provider = tracer_provider is None
        if tracer_provider is None:
            tracer_provider = TracerProvider(
                resource=Resource.create({"service.name": service_name}),
                id_generator=RecordIdGenerator(),
            )
        if span_exporter is not None:
            processor = (
                BatchSpanProcessor(span_exporter) if batch else SimpleSpanProcessor(span_exporter)
            )
            tracer_provider.add_span_processor(processor)
        current: IdGenerator = tracer_provider.id_generator
        if isinstance(current, RecordIdGenerator):
            generator = current
        else:
            generator = RecordIdGenerator(current)
            tracer_provider.id_generator = generator  # type: ignore[assignment]
        self._ids = generator
        self.provider = tracer_provider
        self._tracer = tracer_provider.get_tracer(INSTRUMENTATION_SCOPE)
        self.spans_exported = 0
        # Many spans link the same producer span: its Link is built once.
        self._links: dict[TraceContext, Link] = {}

    def record_span(
        self,
        name: str,
        start_time: float,
        end_time: float,
        attributes: Mapping[str, Any],
        status: str,
    ) -> None:
        """Make a root span (the published ``SpanSink`` protocol: no ids available)."""
        self._emit(name, start_time, end_time, attributes, status, None, None, None)

    def export_span(self, record: SagaSpanRecord) -> None:
        """Make a span with the record's ids, parent, times and links."""
        self._emit(
            record.name,
            record.start_time,
            record.end_time,
            record.attributes,
            record.status,
            record.trace_id,
            record.span_id,
            record.parent_span_id,
            record.links,
        )

    def export_agent_span(self, record: AgentSpanRecord) -> None:
        """Make an agent span with the record's ids, parent, times, span events and links."""
        self._emit(
            record.name,
            record.start_time,
            record.end_time,
            record.attributes,
            record.status,
            record.trace_id,
            record.span_id,
            record.parent_span_id,
            record.links,
            record.events,
        )

    def _link(self, context: TraceContext) -> Link:
        link = self._links.get(context)
        if link is None:
            if len(self._links) >= _MAX_CACHED_LINKS:
                self._links.clear()
            state = TraceState.from_header([context.tracestate]) if context.tracestate else None
            link = self._links[context] = Link(
                SpanContext(
                    trace_id=int(context.trace_id, 16),
                    span_id=int(context.span_id, 16),
                    is_remote=True,
                    trace_flags=TraceFlags(context.trace_flags),
                    trace_state=state,
                )
            )
        return link

    def _emit(
        self,
        name: str,
        start_time: float,
        end_time: float,
        attributes: Mapping[str, Any],
        status: str,
        trace_id: str | None,
        span_id: str | None,
        parent_span_id: str | None,
        links: tuple[TraceContext, ...] = (),
        events: tuple[SpanEventRecord, ...] = (),
    ) -> None:
        context = None
        if trace_id and parent_span_id:
            parent = SpanContext(
                trace_id=int(trace_id, 16),
                span_id=int(parent_span_id, 16),
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
            context = trace_api.set_span_in_context(trace_api.NonRecordingSpan(parent))
        else:
            # An empty context, so a span current in the caller's context never becomes the
            # parent of a saga span.
            context = trace_api.set_span_in_context(trace_api.INVALID_SPAN)
        span_attributes = {key: _attribute_value(value) for key, value in attributes.items()}
        if status == "compensating":
            span_attributes[_STATUS_COMPENSATING] = True
        self._ids.set_next(
            int(trace_id, 16) if trace_id else None, int(span_id, 16) if span_id else None
        )
        try:
            span = self._tracer.start_span(
                name,
                context=context,
                kind=SpanKind.INTERNAL,
                attributes=span_attributes,
                links=[self._link(link) for link in links] if links else None,
                start_time=_ns(start_time),
            )
        finally:
            self._ids.clear()
        for event in events:
            span.add_event(
                event.name,
                {key: _attribute_value(value) for key, value in event.attributes.items()},
                timestamp=_ns(event.time),
            )
        if status == "ok":
            span.set_status(Status(StatusCode.OK))
        elif status == "error":
            description = (
                attributes.get("agent.saga.error")
                or attributes.get("agent.saga.reason")
                or attributes.get("error.type")
            )
            span.set_status(Status(StatusCode.ERROR, str(description or "")))
        span.end(end_time=_ns(max(end_time, start_time)))
        self.spans_exported += 1

    def force_flush(self, timeout_seconds: float = 30.0) -> bool:
        """Export every span made so far; returns whether that finished in time."""
        return self.provider.force_flush(int(timeout_seconds * 1000))

    def shutdown(self) -> None:
        """Flush, and shut the provider down if the sink created it."""
        self.force_flush()
        if self._owns_provider:
            self.provider.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def otlp_http_span_sink(
    endpoint: str,
    *,
    service_name: str = "agent-hypervisor",
    batch: bool = True,
    timeout_seconds: float = 10.0,
) -> OTelSpanSink:
    """Return an :class:`OTelSpanSink` exporting over OTLP/HTTP (protobuf).

    Args:
        endpoint: the collector's base URL (``http://otel-collector:4318``) or its full traces
            URL (ending in ``/v1/traces``).
        service_name: ``service.name`` of the spans' resource.
        batch: export in background batches (``True``) or on every span.
        timeout_seconds: per-request timeout.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    exporter = OTLPSpanExporter(endpoint=url, timeout=timeout_seconds)
    return OTelSpanSink(span_exporter=exporter, service_name=service_name, batch=batch)


class _HasState(Protocol):
    @property
    def state(self) -> RingMetricsState: ...


class OTelRingMetricsBridge:
    """Ring metrics as OpenTelemetry instruments, observed from the live state at collection.

    Instruments (names as the Prometheus series, so an OpenTelemetry Prometheus exporter or
    collector gives the same series): observable counters
    ``agent_hypervisor_ring_transitions_total`` (event_type, agent_did, session_id) and
    ``agent_hypervisor_ring_breaches_total`` (agent_did, session_id); observable gauges
    ``agent_hypervisor_ring_current`` (agent_did) and
    ``agent_hypervisor_ring_elevation_duration_seconds`` (agent_did, unit ``s``, open
    elevations measured in event time). Observable counters report cumulative totals, which is
    exactly what the state holds, so nothing is double counted however often metrics are
    collected. Agents and sessions beyond the guard's limits fold into ``"__overflow__"``
    (counters summed, the ring gauge reporting the lowest ring, the elevation the longest).

    Args:
        source: a ``RingMetricsCollector`` (anything with a ``state``) or a ``RingMetricsState``.
        meter: the meter to create instruments on; else one from ``meter_provider`` (or the
            global provider) named :data:`INSTRUMENTATION_SCOPE`.
        meter_provider: used when ``meter`` is ``None``.
        max_agents: agents with series of their own.
        max_sessions: sessions with series of their own.
        session_label: give the counters a ``session_id`` attribute (the default); ``False``
            sums them over sessions.
    """

    def __init__(
        self,
        source: _HasState | RingMetricsState,
        meter: Meter | None = None,
        *,
        meter_provider: MeterProvider | None = None,
        max_agents: int = DEFAULT_MAX_AGENTS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        session_label: bool = True,
    ) -> None:
        from opentelemetry import metrics

        self.session_label = session_label
        self._state = source if isinstance(source, RingMetricsState) else source.state
        self.guard = LabelGuard(max_agents=max_agents, max_sessions=max_sessions)
        if meter is None:
            provider = (
                meter_provider if meter_provider is not None else metrics.get_meter_provider()
            )
            meter = provider.get_meter(INSTRUMENTATION_SCOPE)
        self.meter = meter
        meter.create_observable_counter(
            METRIC_RING_TRANSITIONS_TOTAL,
            callbacks=[self._transitions],
            description="Ring transition events (assigned, elevated, demoted, expired) by type",
        )
        meter.create_observable_counter(
            METRIC_RING_BREACHES_TOTAL,
            callbacks=[self._breaches],
            description="Ring boundary breaches detected",
        )
        meter.create_observable_gauge(
            METRIC_RING_CURRENT,
            callbacks=[self._rings],
            description="Current execution ring of each agent (0=root, 3=sandbox)",
        )
        meter.create_observable_gauge(
            METRIC_RING_ELEVATION_DURATION,
            callbacks=[self._elevations],
            unit="s",
            description="Seconds of the agent's current or last ring elevation, in event time",
        )

    def _admit(self, label: str, value: str) -> str:
        return self.guard.admit(label, value, count=False)

    def _session(self, session: str) -> dict[str, str]:
        return {"session_id": self._admit("session_id", session)} if self.session_label else {}

    def _transitions(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[tuple[str, str], ...], int] = {}
        for (event_type, agent, session), count in list(self._state.transitions.items()):
            labels = {"event_type": event_type, "agent_did": self._admit("agent_did", agent)}
            labels.update(self._session(session))
            key = tuple(labels.items())
            totals[key] = totals.get(key, 0) + count
        return [Observation(count, dict(key)) for key, count in totals.items()]

    def _breaches(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[tuple[str, str], ...], int] = {}
        for (agent, session), count in list(self._state.breaches.items()):
            labels = {"agent_did": self._admit("agent_did", agent)}
            labels.update(self._session(session))
            key = tuple(labels.items())
            totals[key] = totals.get(key, 0) + count
        return [Observation(count, dict(key)) for key, count in totals.items()]

    def _rings(self, options: CallbackOptions) -> Iterable[Observation]:
        rings: dict[str, int] = {}
        for agent, ring in list(self._state.current_rings.items()):
            folded = self._admit("agent_did", agent)
            held = rings.get(folded)
            rings[folded] = ring if held is None else min(held, ring)
        return [Observation(ring, {"agent_did": agent}) for agent, ring in rings.items()]

    def _elevations(self, options: CallbackOptions) -> Iterable[Observation]:
        durations = dict(list(self._state.elevation_durations.items()))
        durations.update(self._state.open_elevations())
        longest: dict[str, float] = {}
        for agent, seconds in durations.items():
            folded = self._admit("agent_did", agent)
            longest[folded] = max(seconds, longest.get(folded, 0.0))
        return [Observation(seconds, {"agent_did": agent}) for agent, seconds in longest.items()]
