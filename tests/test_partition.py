"""Partition routing: stable hashing, family keys, one slot per partition, the layout record."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.partition import (
    MAX_PARTITIONS,
    SAGA_FAMILY,
    LayoutRecord,
    PartitionLayout,
    decode_layout_record,
    default_partition_key,
    encode_layout_record,
    key_hash_slot,
    partition_index,
    partition_tags,
    single_slot,
)
from hypervisor.observability._core.spans import SAGA_SPAN_EVENTS
from hypervisor.observability.workers._dlq import dlq_name
from redis_cluster import RedisCluster

names = st.text(min_size=1, max_size=40)
stream_names = st.text(min_size=1, max_size=30).filter(lambda s: "{" not in s and "}" not in s)
counts = st.integers(min_value=1, max_value=MAX_PARTITIONS)
optional_names = st.none() | names

SAGA_TYPES = sorted(t for t in EventType if t.value in SAGA_FAMILY)


@settings(max_examples=300, deadline=None)
@given(key=names, n=counts)
def test_a_key_always_maps_to_the_same_partition_in_range(key: str, n: int) -> None:
    """The partition of a key is a pure function of the key and the count, within 0..n-1."""
    index = partition_index(key, n)
    assert 0 <= index < n
    assert partition_index(key, n) == index
    assert partition_index(str(key), n) == index


def test_partitions_do_not_depend_on_the_process_hash_seed() -> None:
    """Two processes with different ``PYTHONHASHSEED`` route the same keys the same way (the
    hash is CRC-32, not Python's randomised ``hash``)."""
    keys = [f"did:agent:{i}" for i in range(50)] + ["saga-é", "ß", ""]
    program = (
        "import sys, json; from hypervisor.observability._core.partition import partition_index;"
        "print(json.dumps([partition_index(k, 12) for k in json.loads(sys.argv[1])]))"
    )
    outputs = set()
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", program, json.dumps(keys)],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        )
        outputs.add(done.stdout)
    assert outputs == {json.dumps([partition_index(k, 12) for k in keys]) + "\n"}


def test_saga_family_is_every_saga_type_and_the_handoff() -> None:
    """Every ``saga.*`` event type and ``security.saga_handoff`` route by saga id, and the saga
    span state's event types are all among them."""
    assert {t.value for t in EventType if t.value.startswith("saga.")} < SAGA_FAMILY
    assert EventType.SAGA_HANDOFF.value in SAGA_FAMILY
    assert len(SAGA_FAMILY) == 11
    assert {t.value for t in SAGA_SPAN_EVENTS} < SAGA_FAMILY


@st.composite
def saga_events(draw: st.DrawFn) -> list[HypervisorEvent]:
    """The events of one saga, hand-offs between agents and sessions included."""
    saga_id = draw(names)
    via_payload = draw(st.booleans())
    events = []
    for kind in draw(st.lists(st.sampled_from(SAGA_TYPES), min_size=1, max_size=30)):
        payload: dict[str, object] = {"step_id": draw(names)}
        if via_payload:
            payload["saga_id"] = saga_id
        events.append(
            HypervisorEvent(
                event_type=kind,
                agent_did=draw(optional_names),
                session_id=draw(optional_names),
                # Without a payload saga id the saga is known by its causal trace id.
                causal_trace_id=draw(optional_names) if via_payload else saga_id,
                payload=payload,
            )
        )
    return events


@settings(max_examples=200, deadline=None)
@given(events=saga_events(), n=counts)
def test_every_event_of_one_saga_lands_in_one_partition(
    events: list[HypervisorEvent], n: int
) -> None:
    """Creation, steps, failures, compensation, completion and hand-offs of one saga share a
    partition whatever their agents and sessions."""
    layout = PartitionLayout("s", n)
    assert len({layout.partition(event) for event in events}) == 1


@settings(max_examples=200, deadline=None)
@given(agent=optional_names, sessions=st.lists(optional_names, min_size=1, max_size=20), n=counts)
def test_ring_events_of_one_agent_land_in_one_partition(
    agent: str | None, sessions: list[str | None], n: int
) -> None:
    """Ring events route by agent (``"unknown"`` without one, as the ring state counts them),
    whatever their sessions."""
    ring_types = [t for t in EventType if t.value.startswith("ring.")]
    layout = PartitionLayout("s", n)
    events = [
        HypervisorEvent(event_type=ring_types[i % len(ring_types)], agent_did=agent, session_id=s)
        for i, s in enumerate(sessions)
    ]
    assert {default_partition_key(e) for e in events} == {agent or "unknown"}
    assert len({layout.partition(e) for e in events}) == 1


def test_session_and_other_events_route_by_their_documented_keys() -> None:
    """Session events by session (else agent, else event id); other events by agent (else
    session, else event id); a plain-string event type routes like its enum member."""
    e = HypervisorEvent
    assert default_partition_key(e(event_type=EventType.SESSION_JOINED, session_id="s1")) == "s1"
    assert default_partition_key(e(event_type=EventType.SESSION_JOINED, agent_did="a")) == "a"
    lone = e(event_type=EventType.SESSION_ARCHIVED)
    assert default_partition_key(lone) == lone.event_id
    vfs = e(event_type=EventType.VFS_WRITE, agent_did="a", session_id="s1")
    assert default_partition_key(vfs) == "a"
    assert default_partition_key(e(event_type=EventType.AUDIT_COMMITTED, session_id="s1")) == "s1"
    plain = e(event_type="saga.created", payload={"saga_id": "g"})  # type: ignore[arg-type]
    assert default_partition_key(plain) == "g"


def test_a_user_key_function_replaces_the_default() -> None:
    """A layout built with ``key=`` routes every event by that function."""
    layout = PartitionLayout("s", 16, key=lambda event: event.session_id or "")
    events = [
        HypervisorEvent(event_type=t, session_id="tenant-7", agent_did=f"a{i}")
        for i, t in enumerate(EventType)
    ]
    assert {layout.partition(event) for event in events} == {partition_index("tenant-7", 16)}


@settings(max_examples=12, deadline=None)
@given(
    prefix=st.text(max_size=20),
    style=st.sampled_from(["sequential", "random-hex", "did"]),
    n=st.sampled_from([3, 12, 64]),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_many_keys_spread_within_a_few_percent(prefix: str, style: str, n: int, seed: int) -> None:
    """10 000 keys per partition on average (sequential numbers, random hex, DIDs) give every
    partition within 6 % of the mean (six standard deviations of a uniform spread)."""
    rng = random.Random(seed)
    total = n * 10_000
    if style == "sequential":
        keys = (f"{prefix}{i}" for i in range(total))
    elif style == "random-hex":
        keys = (f"{prefix}{rng.getrandbits(64):016x}" for _ in range(total))
    else:
        keys = (f"did:hypervisor:{prefix}agent-{i:06d}" for i in range(total))
    counts_ = Counter(partition_index(key, n) for key in keys)
    assert len(counts_) == n
    mean = total / n
    assert max(abs(c - mean) for c in counts_.values()) < 0.06 * mean


def test_key_hash_slot_follows_the_cluster_specification() -> None:
    """CRC16-XMODEM of ``123456789`` is 0x31C3; a non-empty hash tag (first ``{`` to the next
    ``}``) replaces the key, an empty one does not."""
    assert key_hash_slot("123456789") == 0x31C3 % 16384
    assert key_hash_slot(b"123456789") == key_hash_slot("123456789")
    assert key_hash_slot("{user1000}.following") == key_hash_slot("{user1000}.followers")
    assert key_hash_slot("{user1000}.following") == key_hash_slot("user1000")
    assert key_hash_slot("foo{}{bar}") != key_hash_slot("bar")
    assert key_hash_slot("foo{{bar}}zap") == key_hash_slot("{bar")
    assert key_hash_slot("foo{bar}{zap}") == key_hash_slot("bar")


@settings(max_examples=200, deadline=None)
@given(
    stream=stream_names,
    n=counts,
    data=st.data(),
    states=st.lists(st.tuples(names, names), max_size=4),
)
def test_every_key_of_a_partition_shares_its_slot(
    stream: str, n: int, data: st.DataObject, states: list[tuple[str, str]]
) -> None:
    """A partition's stream, dead letters and state keys (any group and derivation) map to the
    partition's slot; its dead-letter key is the workers' dead-letter name of its stream key."""
    layout = PartitionLayout(stream, n)
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    names_ = layout.keys(index, states)
    state_keys = [f"{p}:{suffix}" for p in names_[2:] for suffix in ("lease", "meta", "seen:1")]
    assert single_slot([*names_, *state_keys]) == layout.slot(index)
    assert layout.stream_key(index) in (
        f"{{{stream}:p{index}}}",
        *(f"{{{stream}:p{index}.{k}}}" for k in range(1, 100 * n)),
    )
    assert layout.dead_letter_key(index) == dlq_name(layout.stream_key(index))
    assert key_hash_slot(layout.layout_key) == key_hash_slot(stream)


@settings(max_examples=100, deadline=None)
@given(stream=stream_names, n=counts)
def test_partition_slots_spread_evenly_over_the_slot_space(stream: str, n: int) -> None:
    """Partition i's slot lies in the i-th of n equal slot ranges, so the partitions are
    distinct keys in increasing slots."""
    layout = PartitionLayout(stream, n)
    assert len(set(partition_tags(stream, n))) == n
    for index in range(n):
        assert index * 16384 // n <= layout.slot(index) < (index + 1) * 16384 // n


@pytest.mark.parametrize("masters", [3, 4, 5, 6])
@pytest.mark.parametrize("n", [3, 6, 12, 24, 64])
def test_partitions_spread_over_the_masters_of_an_even_slot_split(masters: int, n: int) -> None:
    """Over masters holding equal contiguous slot ranges (as ``redis-cli --cluster create``
    makes them), the partitions per master differ by at most one, by two only where a range
    boundary splits a partition's range."""
    ranges = [(m * 16384 // masters, (m + 1) * 16384 // masters) for m in range(masters)]
    per_master = Counter(
        next(m for m, (low, high) in enumerate(ranges) if low <= slot < high)
        for slot in (PartitionLayout("hvobs:events", n).slot(i) for i in range(n))
    )
    spread = [per_master.get(m, 0) for m in range(masters)]
    assert max(spread) - min(spread) <= (0 if n % masters == 0 else 2), spread


def test_single_slot_refuses_keys_of_several_slots() -> None:
    """Keys in two slots (a CROSSSLOT on a cluster) and an empty list are refused."""
    with pytest.raises(ValueError, match="several slots"):
        single_slot(["{a}:x", "{b}:x"])
    with pytest.raises(ValueError, match="no keys"):
        single_slot([])


@pytest.mark.parametrize(
    ("stream", "partitions"),
    [("", 3), ("a{b", 3), ("a}b", 3), ("s", 0), ("s", MAX_PARTITIONS + 1), ("s", True)],
)
def test_a_layout_refuses_bad_names_and_counts(stream: str, partitions: int) -> None:
    """Braces in the stream name (they would change the tags) and counts out of range fail."""
    with pytest.raises(ValueError):  # noqa: PT011 - the messages differ per case
        PartitionLayout(stream, partitions)


def test_partition_indexes_out_of_range_are_refused() -> None:
    """Key names exist only for partitions 0..n-1."""
    layout = PartitionLayout("s", 4)
    with pytest.raises(IndexError):
        layout.stream_key(4)
    with pytest.raises(IndexError):
        layout.state_prefix(-1, "g", "d")


def test_split_groups_a_flush_by_partition_keeping_order() -> None:
    """Each partition's group holds exactly its events, in the order they were given."""
    layout = PartitionLayout("s", 5)
    events = [
        HypervisorEvent(event_type=EventType.RING_ASSIGNED, agent_did=f"a{i % 9}")
        for i in range(60)
    ]
    groups = layout.split(events)
    assert sorted(e.event_id for g in groups.values() for e in g) == sorted(
        e.event_id for e in events
    )
    for index, group in groups.items():
        assert group == [e for e in events if layout.partition(e) == index]


def test_the_layout_record_round_trips() -> None:
    """A layout's record decodes to itself and names the hash."""
    record = PartitionLayout("s", 12).record()
    assert decode_layout_record(encode_layout_record(record)) == record
    assert record == LayoutRecord(partitions=12, hash="crc32", tags="spread1", version=1)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_a_hostile_layout_record_raises_only_value_error(data: bytes) -> None:
    """Whatever bytes sit at the layout key, reading them raises ``ValueError`` or gives a
    record within range."""
    try:
        record = decode_layout_record(data)
    except ValueError:
        return
    assert 1 <= record.partitions <= MAX_PARTITIONS


@pytest.mark.parametrize(
    "data",
    [b'{"partitions": 0}', b'{"partitions": 5000}', b'{"partitions": 3, "version": 2}', b"[3]"],
)
def test_out_of_range_or_newer_layout_records_are_refused(data: bytes) -> None:
    """A count out of range, a newer format or another shape is not a record this release
    reads."""
    with pytest.raises(ValueError):  # noqa: PT011 - the messages differ per case
        decode_layout_record(data)


@pytest.mark.redis
@pytest.mark.slow
def test_slots_agree_with_a_real_cluster(redis_cluster: RedisCluster) -> None:
    """The pure slot function gives what ``CLUSTER KEYSLOT`` answers, for partition keys and
    arbitrary ones (tags, empty tags, non-ASCII)."""
    rng = random.Random(7)
    layout = PartitionLayout("hvobs:events", 12)
    keys = [name for i in range(12) for name in layout.keys(i, [("g", "ring")])]
    keys += [layout.layout_key, "foo{}{bar}", "foo{{bar}}zap", "ké{ÿ}", "123456789"]
    keys += [f"k{rng.getrandbits(40):x}{{{rng.randint(0, 99)}}}" for _ in range(100)]
    for key in keys:
        assert key_hash_slot(key) == redis_cluster.keyslot(key), key
