"""Snapshots of derivation state on the wire: msgpack of the core's snapshot structs.

A snapshot is the msgpack array ``[schema version, snapshot struct]``, the struct being one of
the tagged structs of :mod:`hypervisor.observability._core.snapshot`. It is decoded in two typed
steps (the envelope, then the struct of a version this release reads) straight into those
structs: bytes from the store are data, never code, and anything that is not a snapshot of a
readable version raises :class:`WorkerStateError`.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import msgspec

from hypervisor.observability._core.snapshot import (
    SNAPSHOT_SCHEMA_VERSION,
    StateSnapshot,
    snapshot_of,
    state_of,
    widen_ints,
)
from hypervisor.observability.errors import WorkerStateError

__all__ = ["LEGACY_PICKLE_PREFIX", "WorkerStateError", "dump_state", "load_state"]

LEGACY_PICKLE_PREFIX: Final = b"hvobs-state-1\n"
"""Prefix of the pickled snapshots of earlier releases, which are refused (see load_state)."""

_encoder: Final = msgspec.msgpack.Encoder()
_envelope_decoder: Final = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])
_state_decoder: Final = msgspec.msgpack.Decoder(StateSnapshot)


def dump_state(state: object) -> bytes:
    """Serialise a derivation state (``RingMetricsState`` or ``SagaSpanState``).

    Raises:
        TypeError: ``state`` is of another kind.
    """
    snapshot = snapshot_of(state)
    try:
        return _encoder.encode((SNAPSHOT_SCHEMA_VERSION, snapshot))
    except OverflowError:  # an integer beyond 64 bits (rare): the slow path lists them apart
        return _encoder.encode((SNAPSHOT_SCHEMA_VERSION, widen_ints(snapshot)))


def load_state(data: bytes) -> object:
    """Load a state written by :func:`dump_state`.

    Raises:
        WorkerStateError: the bytes are not a snapshot of a schema version this release reads
            (a pickle of an earlier release included: those are refused, not loaded).
    """
    if bytes(data[: len(LEGACY_PICKLE_PREFIX)]) == LEGACY_PICKLE_PREFIX:
        raise WorkerStateError(
            "the state snapshot is a pickle written by an earlier release, which this release "
            "does not load (it could run code); restart one worker of the group with "
            "--reset-state to discard the old state"
        )
    try:
        version, body = _envelope_decoder.decode(data)
    except Exception as exc:  # msgspec raises DecodeError, ValidationError, RecursionError...
        raise WorkerStateError(f"unreadable state snapshot: {_reason(exc)}") from exc
    if version > SNAPSHOT_SCHEMA_VERSION:
        raise WorkerStateError(
            f"the state snapshot has schema version {version}, newer than this release reads "
            f"({SNAPSHOT_SCHEMA_VERSION}): upgrade this worker, or start one with --reset-state "
            "to discard the state"
        )
    if version < 1:
        raise WorkerStateError(f"unreadable state snapshot: schema version {version}")
    try:
        with _collector_paused():
            return state_of(_state_decoder.decode(body))
    except Exception as exc:
        raise WorkerStateError(f"unreadable state snapshot: {_reason(exc)}") from exc


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a state is built. A large state allocates
    hundreds of thousands of tracked objects, which would trigger collections that scan the
    heap again and again (a third of the load time, or more, measured); it creates no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _reason(exc: Exception) -> str:
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
