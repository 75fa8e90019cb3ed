"""The local index's shared strings: decoded events share one object per distinct session,
agent and short payload value, stay equal to what was emitted, and the sharing stays bounded."""

from __future__ import annotations

import random

import msgspec
import pytest

from hypervisor.observability._core.codec import decode_events, encode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.intern import StringPool
from hypervisor.observability._core.store import EventStore
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer


def _copy(text: str) -> str:
    """An equal string that is a distinct object (as a decoder makes one per event)."""
    return "".join(list(text))


def _events(count: int, sessions: int, agents: int, seed: int = 3) -> list[HypervisorEvent]:
    rng = random.Random(seed)
    session_ids = [f"sess-{rng.getrandbits(48):012x}" for _ in range(sessions)]
    dids = [f"did:mesh:{rng.getrandbits(96):024x}" for _ in range(agents)]
    tools = ["file_read", "shell", "x" * 200]  # the last one is too long to pool
    return [
        HypervisorEvent(
            event_type=EventType.VFS_WRITE if i % 2 else EventType.RING_ASSIGNED,
            session_id=_copy(session_ids[i % sessions]) if i % 5 else None,
            agent_did=_copy(dids[rng.randrange(agents)]),
            payload={"tool": _copy(rng.choice(tools)), "ring": rng.randrange(4), "n": [i]},
        )
        for i in range(count)
    ]


def _distinct_objects(values: list[object]) -> dict[object, int]:
    """For each distinct value, how many distinct objects carry it."""
    objects: dict[object, set[int]] = {}
    for value in values:
        objects.setdefault(value, set()).add(id(value))
    return {value: len(ids) for value, ids in objects.items()}


@pytest.mark.anyio
@pytest.mark.redis
async def test_reader_stores_one_object_per_session_agent_and_short_value(
    redis_server: RedisServer, stream_name: str
) -> None:
    """Events a bus's reader decodes from Redis share one string object per distinct session,
    agent and short payload value (long values are not pooled), and compare and read as the
    emitted ones; they stay frozen."""
    emitted = _events(600, sessions=7, agents=40)
    async with RedisEventBus.from_url(redis_server.url, stream_name, reader=False) as producer:
        await producer.emit_many(emitted)
        await producer.flush()
    # A small read_count: keys first seen in one read are shared with the events of later ones.
    async with RedisEventBus.from_url(redis_server.url, stream_name, read_count=64) as bus:
        await bus.sync()
        stored = await bus.all_events()
    assert stored == emitted
    assert [event.to_dict() for event in stored] == [event.to_dict() for event in emitted]
    sessions = _distinct_objects([e.session_id for e in stored if e.session_id is not None])
    agents = _distinct_objects([e.agent_did for e in stored])
    assert len(sessions) == 7
    assert set(sessions.values()) == {1}
    assert len(agents) == 40
    assert set(agents.values()) == {1}
    tools = _distinct_objects([e.payload["tool"] for e in stored])
    assert tools["file_read"] == 1
    assert tools["shell"] == 1
    assert tools["x" * 200] > 1  # too long to pool: each event keeps its own
    with pytest.raises(AttributeError):
        stored[0].session_id = "other"  # type: ignore[misc]


def test_store_shares_keys_only_for_its_own_events() -> None:
    """``extend(own_events=True)`` gives later own events of a key the index's key object;
    without it, the events a user passes keep their own strings."""
    first = HypervisorEvent(session_id=_copy("sess-a"), agent_did=_copy("did:mesh:a"))
    user = HypervisorEvent(session_id=_copy("sess-a"), agent_did=_copy("did:mesh:a"))
    session, agent = user.session_id, user.agent_did
    store = EventStore(None)
    store.extend([first], own_events=True)
    store.extend([user])
    assert user.session_id is session
    assert user.agent_did is agent
    own = HypervisorEvent(session_id=_copy("sess-a"), agent_did=_copy("did:mesh:a"))
    store.extend([own], own_events=True)
    assert own.session_id is first.session_id
    assert own.agent_did is first.agent_did
    assert store.query(session_id="sess-a", agent_did="did:mesh:a") == [first, user, own]


def test_shared_keys_are_bounded_by_the_index_under_a_flood_of_distinct_keys() -> None:
    """A flood of distinct sessions and agents through a bounded store: the shared key objects
    are the index's own keys, which never outnumber the stored events, and a key that comes
    back after its events were evicted is shared anew from its new first event."""
    store = EventStore(50)
    datas = [encode_event(event) for event in _events(3000, sessions=2000, agents=2500)]
    for start in range(0, len(datas), 97):
        decoded, bad = decode_events(datas[start : start + 97])
        assert not bad
        store.extend(decoded, own_events=True)
        assert len(store._by_session) <= 50
        assert len(store._by_agent) <= 50
        stored = store.all()
        for index, field in ((store._by_session, "session_id"), (store._by_agent, "agent_did")):
            keys = {id(key) for key in index}
            values = [getattr(e, field) for e in stored if getattr(e, field) is not None]
            assert {id(value) for value in values} <= keys
    back = [HypervisorEvent(session_id=_copy("sess-back")) for _ in range(60)]
    store.extend(back[:1], own_events=True)
    store.extend([HypervisorEvent() for _ in range(50)], own_events=True)  # evicts it
    store.extend(back[1:], own_events=True)
    assert {id(e.session_id) for e in store.by_session("sess-back")} == {id(back[1].session_id)}


def test_string_pool_is_bounded_and_changes_only_short_exact_str_values() -> None:
    """The pool never holds more than ``max_size`` strings whatever values flood it; it shares
    short top-level ``str`` values only (not keys, longer strings, subclasses, nested values or
    other types), and the payloads stay equal."""

    class Tag(str):
        pass

    pool = StringPool(max_size=8, max_chars=10)

    def payload() -> dict[str, object]:
        return {"a": _copy("value"), "b": Tag("tag"), "c": [_copy("value")], "d": _copy("y" * 11)}

    first, second = HypervisorEvent(payload=payload()), HypervisorEvent(payload=payload())
    before = msgspec.structs.asdict(second)
    pool.share_payloads([first, second])
    assert second.payload["a"] is first.payload["a"]
    assert second.payload["b"] is not first.payload["b"]
    assert type(second.payload["b"]) is Tag
    assert second.payload["c"][0] is not first.payload["c"][0]
    assert second.payload["d"] is not first.payload["d"]
    assert second.payload["a"] is not second.payload["c"][0]
    assert msgspec.structs.asdict(second) == before
    for n in range(1000):
        pool.share_payloads([HypervisorEvent(payload={"k": f"v{n}"})])
        assert len(pool) <= 8
    with pytest.raises(ValueError, match="must be >= 1"):
        StringPool(max_size=0)
