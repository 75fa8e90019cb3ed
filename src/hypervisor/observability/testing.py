"""Helpers for tests of code that uses ``hypervisor.observability``.

* :class:`RecordingSpanSink`: a span sink that keeps every span it receives.
* :class:`RecordingPrometheusExporter`: a ``PrometheusExporterProtocol`` that records every call
  and keeps running counter totals and the last value of each gauge.

Example::

    bus = HypervisorEventBus()
    sink = RecordingSpanSink()
    SagaSpanExporter(bus, sink=sink)
    ...  # emit saga events
    assert [r.name for r in sink.records] == ["saga.step.validate"]
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from hypervisor.observability._core.agent_spans import AgentSpanRecord
from hypervisor.observability._core.spans import SagaSpanRecord

__all__ = ["ExporterCall", "LabelKey", "RecordingPrometheusExporter", "RecordingSpanSink"]

LabelKey = tuple[tuple[str, str], ...]
"""Labels as a hashable key: the ``(name, value)`` pairs sorted by name."""


def _label_key(labels: dict[str, str] | None) -> LabelKey:
    return tuple(sorted((labels or {}).items()))


class RecordingSpanSink:
    """A span sink that keeps what it receives, for assertions.

    It implements both sink protocols: ``SagaSpanExporter`` hands it whole records (ids
    included) through :meth:`export_span`; code that calls the published
    ``record_span(name=..., ...)`` gets a record built from those arguments. Agent spans
    (``export_agent_span``) are kept apart, in :attr:`agent_records`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[SagaSpanRecord] = []
        self._agent_records: list[AgentSpanRecord] = []

    def export_agent_span(self, record: AgentSpanRecord) -> None:
        """Keep an agent span ``record``."""
        with self._lock:
            self._agent_records.append(record)

    @property
    def agent_records(self) -> list[AgentSpanRecord]:
        """A copy of the agent span records received, in order."""
        with self._lock:
            return list(self._agent_records)

    def export_span(self, record: SagaSpanRecord) -> None:
        """Keep ``record``."""
        with self._lock:
            self._records.append(record)

    def record_span(
        self,
        name: str,
        start_time: float,
        end_time: float,
        attributes: dict[str, Any],
        status: str,
    ) -> None:
        """Keep a record made of the published ``SpanSink`` arguments."""
        record = SagaSpanRecord(
            name=name,
            saga_id=str(attributes.get("agent.saga.id", "")),
            step_id=str(attributes.get("agent.saga.step_id", "")),
            step_action=str(attributes.get("agent.saga.step_action", "")),
            start_time=start_time,
            end_time=end_time,
            status=status,
            attributes=dict(attributes),
        )
        self.export_span(record)

    @property
    def records(self) -> list[SagaSpanRecord]:
        """A copy of the records received, in order."""
        with self._lock:
            return list(self._records)

    @property
    def names(self) -> list[str]:
        """The names of the records received, in order."""
        return [record.name for record in self.records]

    def clear(self) -> None:
        """Forget every record."""
        with self._lock:
            self._records.clear()


@dataclass(frozen=True, slots=True)
class ExporterCall:
    """One call received by :class:`RecordingPrometheusExporter`."""

    kind: Literal["gauge", "counter"]
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)
    help_text: str = ""


class RecordingPrometheusExporter:
    """A ``PrometheusExporterProtocol`` that records calls and keeps the resulting values.

    Attributes:
        calls: every call, in order.
        counters: ``(name, label key) -> running total`` of ``inc_counter`` values.
        gauges: ``(name, label key) -> last value`` set with ``set_gauge``.
    """

    def __init__(self) -> None:
        self.calls: list[ExporterCall] = []
        self.counters: dict[tuple[str, LabelKey], float] = {}
        self.gauges: dict[tuple[str, LabelKey], float] = {}

    def set_gauge(
        self,
        name: str,
        value: float,
        labels: dict[str, str] | None = None,
        help_text: str = "",
    ) -> None:
        """Record the call and set the gauge."""
        self.calls.append(ExporterCall("gauge", name, value, dict(labels or {}), help_text))
        self.gauges[(name, _label_key(labels))] = value

    def inc_counter(
        self,
        name: str,
        value: float = 1.0,
        labels: dict[str, str] | None = None,
        help_text: str = "",
    ) -> None:
        """Record the call and add ``value`` to the counter's running total."""
        self.calls.append(ExporterCall("counter", name, value, dict(labels or {}), help_text))
        key = (name, _label_key(labels))
        self.counters[key] = self.counters.get(key, 0.0) + value

    def counter(self, name: str, **labels: str) -> float:
        """The running total of counter ``name`` with exactly ``labels`` (0.0 if never sent)."""
        return self.counters.get((name, _label_key(labels)), 0.0)

    def gauge(self, name: str, **labels: str) -> float | None:
        """The last value of gauge ``name`` with exactly ``labels``, ``None`` if never set."""
        return self.gauges.get((name, _label_key(labels)))

    def counter_calls(self, name: str | None = None) -> list[ExporterCall]:
        """The ``inc_counter`` calls, optionally only those for ``name``."""
        return [c for c in self.calls if c.kind == "counter" and name in (None, c.name)]

    def gauge_calls(self, name: str | None = None) -> list[ExporterCall]:
        """The ``set_gauge`` calls, optionally only those for ``name``."""
        return [c for c in self.calls if c.kind == "gauge" and name in (None, c.name)]

    def clear_calls(self) -> None:
        """Forget the recorded calls, keeping the counter totals and gauge values."""
        self.calls.clear()
