"""The event record: the 40 published event types and the immutable ``HypervisorEvent``."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import msgspec

__all__ = ["EventHandler", "EventType", "HypervisorEvent", "new_event_id"]


class EventType(str, Enum):  # noqa: UP042 - the published type; StrEnum changes str() and format()
    """Categorised hypervisor event types; each value is ``"<category>.<name>"``."""

    # Session lifecycle
    SESSION_CREATED = "session.created"
    SESSION_JOINED = "session.joined"
    SESSION_ACTIVATED = "session.activated"
    SESSION_TERMINATED = "session.terminated"
    SESSION_ARCHIVED = "session.archived"
    # Ring transitions
    RING_ASSIGNED = "ring.assigned"
    RING_ELEVATED = "ring.elevated"
    RING_DEMOTED = "ring.demoted"
    RING_ELEVATION_EXPIRED = "ring.elevation_expired"
    RING_BREACH_DETECTED = "ring.breach_detected"
    # Liability
    VOUCH_CREATED = "liability.vouch_created"
    VOUCH_RELEASED = "liability.vouch_released"
    SLASH_EXECUTED = "liability.slash_executed"
    FAULT_ATTRIBUTED = "liability.fault_attributed"
    QUARANTINE_ENTERED = "liability.quarantine_entered"
    QUARANTINE_RELEASED = "liability.quarantine_released"
    # Saga
    SAGA_CREATED = "saga.created"
    SAGA_STEP_STARTED = "saga.step_started"
    SAGA_STEP_COMMITTED = "saga.step_committed"
    SAGA_STEP_FAILED = "saga.step_failed"
    SAGA_COMPENSATING = "saga.compensating"
    SAGA_COMPLETED = "saga.completed"
    SAGA_ESCALATED = "saga.escalated"
    SAGA_FANOUT_STARTED = "saga.fanout_started"
    SAGA_FANOUT_RESOLVED = "saga.fanout_resolved"
    SAGA_CHECKPOINT_SAVED = "saga.checkpoint_saved"
    # VFS / session writes
    VFS_WRITE = "vfs.write"
    VFS_DELETE = "vfs.delete"
    VFS_SNAPSHOT = "vfs.snapshot"
    VFS_RESTORE = "vfs.restore"
    VFS_CONFLICT = "vfs.conflict"
    # Security
    RATE_LIMITED = "security.rate_limited"
    AGENT_KILLED = "security.agent_killed"
    SAGA_HANDOFF = "security.saga_handoff"
    IDENTITY_VERIFIED = "security.identity_verified"
    # Audit
    AUDIT_DELTA_CAPTURED = "audit.delta_captured"
    AUDIT_COMMITTED = "audit.committed"
    AUDIT_GC_COLLECTED = "audit.gc_collected"
    # Verification
    BEHAVIOR_DRIFT = "verification.behavior_drift"
    HISTORY_VERIFIED = "verification.history_verified"


def new_event_id() -> str:
    """Return a fresh event id: 16 lowercase hex characters (64 random bits)."""
    return os.urandom(8).hex()


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _empty_payload() -> dict[str, Any]:
    return {}


class HypervisorEvent(msgspec.Struct, frozen=True, gc=False):
    """An immutable, structured event emitted by the hypervisor.

    Every field has a default; pass them as keywords. ``timestamp`` is timezone-aware UTC, taken
    at construction. ``gc=False`` keeps large stores out of the cyclic garbage collector's scans;
    an event never references itself.
    """

    event_id: str = msgspec.field(default_factory=new_event_id)
    event_type: EventType = EventType.SESSION_CREATED
    timestamp: datetime = msgspec.field(default_factory=_utc_now)
    session_id: str | None = None
    agent_did: str | None = None
    causal_trace_id: str | None = None
    parent_event_id: str | None = None
    payload: dict[str, Any] = msgspec.field(default_factory=_empty_payload)

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a JSON-compatible dict with the published 8 keys, in order."""
        return {
            "event_id": self.event_id,
            "event_type": self.event_type.value,
            "timestamp": self.timestamp.isoformat(),
            "session_id": self.session_id,
            "agent_did": self.agent_did,
            "causal_trace_id": self.causal_trace_id,
            "parent_event_id": self.parent_event_id,
            "payload": self.payload,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HypervisorEvent:
        """Build an event from a ``to_dict()``-shaped mapping (validated).

        Raises:
            EventDecodeError: a field is missing its required type or holds an invalid value.
        """
        from hypervisor.observability._core.codec import event_from_dict

        return event_from_dict(data)


EventHandler = Callable[[HypervisorEvent], None]
"""A subscriber: called with each matching event; its return value is ignored."""
