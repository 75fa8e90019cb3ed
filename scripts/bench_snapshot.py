"""Benchmark the worker state snapshots: size, dump and load time of large states.

Builds a ``RingMetricsState`` with ``N`` agents (each assigned, elevated, half of them demoted,
a quarter with a breach, over 50 sessions) and a ``SagaSpanState`` with ``N`` open sagas and
``N`` open steps (caps raised to fit), and prints for each the snapshot size and the median
time of ``dump_state`` and of ``load_state`` over ``--repeat`` runs.

Usage: ``python scripts/bench_snapshot.py [--agents 10000 100000] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.ring import RingMetricsState
from hypervisor.observability._core.spans import SagaSpanState
from hypervisor.observability.workers._snapshot import dump_state, load_state

_T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ring_state(agents: int) -> RingMetricsState:
    state = RingMetricsState()
    for i in range(agents):
        agent = f"did:mesh:agent-{i:07d}"
        session = f"session-{i % 50}"
        ts = _T0 + timedelta(milliseconds=i)
        for kind, payload in (
            (EventType.RING_ASSIGNED, {"ring": 3}),
            (EventType.RING_ELEVATED, {"from_ring": 3, "to_ring": 1}),
        ):
            state.apply(
                HypervisorEvent(
                    event_type=kind,
                    timestamp=ts,
                    agent_did=agent,
                    session_id=session,
                    payload=payload,
                )
            )
        if i % 2:
            state.apply(
                HypervisorEvent(
                    event_type=EventType.RING_DEMOTED,
                    timestamp=ts + timedelta(seconds=3),
                    agent_did=agent,
                    session_id=session,
                )
            )
        if i % 4 == 0:
            state.apply(
                HypervisorEvent(
                    event_type=EventType.RING_BREACH_DETECTED,
                    timestamp=ts,
                    agent_did=agent,
                    session_id=session,
                )
            )
    return state


def saga_state(sagas: int) -> SagaSpanState:
    state = SagaSpanState(max_spans=0, max_open_steps=sagas, max_open_sagas=sagas)
    for i in range(sagas):
        saga = f"saga-{i:07d}"
        ts = _T0 + timedelta(milliseconds=i)
        state.apply(
            HypervisorEvent(
                event_type=EventType.SAGA_CREATED,
                timestamp=ts,
                causal_trace_id=f"{i:032x}/{i:016x}",
                payload={"saga_id": saga},
            )
        )
        state.apply(
            HypervisorEvent(
                event_type=EventType.SAGA_STEP_STARTED,
                timestamp=ts,
                payload={"saga_id": saga, "step_id": "reserve", "action": "reserve"},
            )
        )
    return state


def timed(call: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``call`` over ``repeat`` runs (garbage collector off while timing)."""
    times: list[float] = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        finally:
            gc.enable()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for n in args.agents:
        states: list[tuple[str, object]] = [
            (f"ring, {n:,} agents", ring_state(n)),
            (f"saga, {n:,} open", saga_state(n)),
        ]
        for label, state in states:
            data = dump_state(state)
            dump_s = timed(partial(dump_state, state), args.repeat)
            load_s = timed(partial(load_state, data), args.repeat)
            print(
                f"{label:<22} size {len(data) / 2**20:7.2f} MiB   dump {dump_s * 1000:8.1f} ms"
                f"   load {load_s * 1000:8.1f} ms"
            )


if __name__ == "__main__":
    main()
