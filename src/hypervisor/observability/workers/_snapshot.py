"""Snapshots of derivation state: pickled, loaded by a restricted unpickler.

The state objects are the core's own (``RingMetricsState``, ``SagaSpanState`` and the small
classes they hold), so pickling them keeps one definition of the state and no hand-written
mirror to drift. Loading resolves only classes of ``hypervisor.observability._core`` and a few
builtins: bytes from Redis can fail to load, never run code.
"""

from __future__ import annotations

import io
import pickle
from typing import Final

from hypervisor.observability.errors import HypervisorObservabilityError

__all__ = ["SNAPSHOT_FORMAT", "WorkerStateError", "dump_state", "load_state"]

SNAPSHOT_FORMAT: Final = b"hvobs-state-1\n"
"""Prefix of every snapshot; a different prefix is a layout this release does not read."""

_ALLOWED_MODULE_PREFIX: Final = "hypervisor.observability._core."
_ALLOWED_GLOBALS: Final = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "getattr"),
        ("collections", "deque"),
        ("collections", "OrderedDict"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
    }
)


class WorkerStateError(HypervisorObservabilityError):
    """Worker state in the store is unreadable (foreign format, corrupt, or a newer layout)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if module.startswith(_ALLOWED_MODULE_PREFIX) or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise WorkerStateError(f"snapshot refers to {module}.{name}, which is not allowed")


def dump_state(state: object) -> bytes:
    """Serialise a derivation state object."""
    return SNAPSHOT_FORMAT + pickle.dumps(state, protocol=5)


def load_state(data: bytes) -> object:
    """Load a state written by :func:`dump_state`.

    Raises:
        WorkerStateError: the bytes are not a snapshot of this format, or refer to classes
            outside the core.
    """
    if not data.startswith(SNAPSHOT_FORMAT):
        raise WorkerStateError("not a worker state snapshot of a format this release reads")
    try:
        return _RestrictedUnpickler(io.BytesIO(data[len(SNAPSHOT_FORMAT) :])).load()
    except WorkerStateError:
        raise
    except Exception as exc:  # pickle raises many unrelated types on corrupt input
        raise WorkerStateError(f"corrupt worker state snapshot: {exc!r}") from exc
