"""``hvobs serve``'s HTTP API through a real uvicorn server on a free port.

Sources: a bus on an in-process log fed by the test (exact expectations), the live demo fleet,
and a real redis-server stream written by another bus (the deployment path).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from hypervisor.observability._bus.bus import RedisEventBus
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability._core.trace import CausalTraceId
from hypervisor.observability.demo import feed_in_process, generate_fleet
from hypervisor.observability.demo.live import LiveFleet, drive
from hypervisor.observability.web.runtime import ServeRuntime, ServeSettings
from redis_server import RedisServer
from serve_support import ServerThread, recent, sse_messages, wait_until

FLEET = generate_fleet(seed=7, agents=6, sagas=4)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def memory_runtime(**settings: object) -> ServeRuntime:
    """A runtime over a bus on an in-process log that only the test feeds."""
    bus = RedisEventBus.in_memory(max_len=50_000, max_events=50_000)
    return ServeRuntime(bus, source="test log", settings=ServeSettings(**settings))  # type: ignore[arg-type]


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """A server over an in-process log holding the demo fleet's history."""
    with ServerThread(memory_runtime) as running:
        running.emit(recent(FLEET))
        yield running


@pytest.fixture
def http(server: ServerThread) -> Iterator[httpx.Client]:
    """An HTTP client of ``server``."""
    with server.client() as client:
        yield client


def test_agents_are_the_fleets_with_the_in_process_rings_and_breaches(
    http: httpx.Client,
) -> None:
    """/api/agents lists every agent of the fleet with the ring the in-process collector
    computes, its open elevation and its breaches."""
    expected = feed_in_process(FLEET).ring
    body = http.get("/api/agents").json()
    agents = {a["agent_did"]: a for a in body["agents"]}
    assert set(agents) == {agent.did for agent in FLEET.agents}
    assert body["total"] == len(FLEET.agents)
    for did, agent in agents.items():
        assert agent["ring"] == expected.current_rings.get(did)
        assert agent["elevated"] == (did in expected.elevation_starts)
        breaches = sum(n for (who, _), n in expected.breaches.items() if who == did)
        assert agent["breaches"] == breaches
    elevated = http.get("/api/agents", params={"elevated": "true"}).json()["agents"]
    assert {a["agent_did"] for a in elevated} == set(expected.elevation_starts)
    assert all(a["elevated_seconds"] is not None for a in elevated)
    breached = http.get("/api/agents", params={"breached": "true"}).json()["agents"]
    assert {a["agent_did"] for a in breached} == {who for who, _ in expected.breaches}


def test_sagas_show_steps_failures_compensations_and_outcomes(http: httpx.Client) -> None:
    """/api/sagas gives each saga's spans: the rolled-back saga has its failed step marked
    (status error) and one compensation span per compensating event, and says rolled_back;
    the escalated one says escalated."""
    body = http.get("/api/sagas", params={"limit": 100}).json()
    sagas = {s["saga_id"]: s for s in body["sagas"]}
    created = [e for e in FLEET.events if e.event_type is EventType.SAGA_CREATED]
    assert set(sagas) == {e.payload["saga_id"] for e in created}
    by_id = sorted(sagas)
    assert sagas[by_id[0]]["state"] == "completed"
    rolled_back = sagas[by_id[1]]
    assert rolled_back["state"] == "rolled_back"
    compensating = [
        e
        for e in FLEET.events
        if e.event_type is EventType.SAGA_COMPENSATING and e.payload["saga_id"] == by_id[1]
    ]
    kinds = [s["kind"] for s in rolled_back["spans"]]
    assert kinds.count("compensation") == len(compensating) >= 1
    assert [s["status"] for s in rolled_back["spans"] if s["kind"] == "step"][-1] == "error"
    assert rolled_back["failed_steps"] == 1
    assert kinds[-1] == "saga"
    assert sagas[by_id[2]]["state"] == "escalated"
    one = http.get(f"/api/sagas/{by_id[1]}").json()
    assert one == rolled_back
    starts = [s["start_time"] for s in one["spans"] if s["kind"] != "saga"]
    assert starts == sorted(starts)


def test_trace_is_the_spawn_tree_with_rings(http: httpx.Client) -> None:
    """/api/traces/{trace_id} is the causal spawn tree: one node per agent span, parents
    before children, each with its parent link, depth and agent's current ring."""
    rings = feed_in_process(FLEET).ring.current_rings
    root = FLEET.agents[0].trace
    listed = http.get("/api/traces").json()
    assert [t["trace_id"] for t in listed["traces"]] == [root.trace_id]
    tree = http.get(f"/api/traces/{root.trace_id}").json()
    nodes = {n["span_id"]: n for n in tree["nodes"]}
    assert set(nodes) == {agent.trace.span_id for agent in FLEET.agents}
    seen: set[str] = set()
    for node in tree["nodes"]:
        assert node["parent_span_id"] is None or node["parent_span_id"] in seen
        seen.add(node["span_id"])
    for agent in FLEET.agents:
        node = nodes[agent.trace.span_id]
        assert node["agent_did"] == agent.did
        assert node["parent_span_id"] == agent.trace.parent_span_id
        assert node["depth"] == agent.trace.depth
        assert node["ring"] == rings.get(agent.did)


def test_events_filters_and_cursor_pages(server: ServerThread, http: httpx.Client) -> None:
    """Filters combine; pages come newest first, each oldest first, and following
    next_cursor visits every match once even while new events are emitted in between."""
    events = [
        HypervisorEvent(
            event_type=(EventType.RING_ELEVATED, EventType.VFS_WRITE)[i % 2],
            agent_did=f"did:mesh:p{i % 3}",
            session_id=f"s{i % 2}",
            timestamp=T0 + timedelta(seconds=i),
            payload={"i": i},
        )
        for i in range(300)
    ]
    server.emit(events)
    params = {"event_type": "ring.elevated", "agent_did": "did:mesh:p1", "limit": "7"}
    expected = [
        e.event_id
        for e in events
        if e.event_type is EventType.RING_ELEVATED and e.agent_did == "did:mesh:p1"
    ]
    first = http.get("/api/events", params=params).json()
    assert [e["event_id"] for e in first["events"]] == expected[-7:]
    assert first["events"][0] == events[int(first["events"][0]["payload"]["i"])].to_dict()
    seen: list[str] = []
    page = first
    while True:
        seen[:0] = [e["event_id"] for e in page["events"]]
        if page["next_cursor"] is None:
            break
        # Newer matching events emitted between pages never show up in older pages.
        server.emit([HypervisorEvent(event_type=EventType.RING_ELEVATED, agent_did="did:mesh:p1")])
        page = http.get("/api/events", params={**params, "cursor": page["next_cursor"]}).json()
    assert seen == expected
    timed = http.get(
        "/api/events",
        params={
            "since": (T0 + timedelta(seconds=10)).isoformat(),
            "until": "2026-03-01T12:00:20Z",
            "session_id": "s0",
            "limit": "1000",
        },
    ).json()
    assert [e["payload"]["i"] for e in timed["events"]] == list(range(10, 21, 2))
    assert timed["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "99999999999999999999999"}, "limit"),
        ({"event_type": "ring.nope"}, "event_type"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-01T00:00:00"}, "since"),
        ({"until": "2026-02-30T00:00:00Z"}, "until"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"session_id": ""}, "session_id"),
        ({"agent_did": "x" * 257}, "agent_did"),
    ],
)
def test_bad_event_parameters_get_400_with_a_message(
    http: httpx.Client, query: dict[str, str], mentions: str
) -> None:
    """Every malformed or out-of-range parameter is answered 400 with a JSON message naming
    it (never 422 or 500)."""
    response = http.get("/api/events", params=query)
    assert response.status_code == 400
    assert mentions in response.json()["error"]


def test_other_bad_requests_and_unknown_ids(http: httpx.Client) -> None:
    """Repeated parameters, bad booleans, enums and trace ids get 400; unknown saga and trace
    ids get 404, a cursor of another server run 409, all as JSON."""
    cases = [
        ("/api/events?limit=1&limit=2", 400),
        ("/api/agents?elevated=yes", 400),
        ("/api/agents?limit=5001", 400),
        ("/api/sagas?state=lost", 400),
        ("/api/traces/not!a-trace", 400),
        ("/api/traces?limit=0", 400),
        ("/api/stream?last_event_id=junk", 400),
        ("/api/sagas/no-such-saga", 404),
        ("/api/sagas/a/b", 404),
        ("/api/traces/abcdef123456", 404),
        ("/api/nothing", 404),
    ]
    for path, status in cases:
        response = http.get(path)
        assert (path, response.status_code) == (path, status)
        assert "error" in response.json(), path
    assert http.post("/api/events").status_code == 405
    stale = http.get("/api/events", params={"cursor": "deadbeef:10"})
    assert stale.status_code == 409
    assert "cursor" in stale.json()["error"]


def test_events_keep_to_dict_shape_and_bound_hostile_payloads(
    server: ServerThread, http: httpx.Client
) -> None:
    """An event's JSON is its to_dict(); one larger than the per-event bound keeps its fields
    with its payload replaced by its size, and a page is cut to the response bound with the
    cursor pointing at the rest."""
    small = HypervisorEvent(agent_did="did:mesh:big", payload={"n": 1, "nested": {"a": [1, 2]}})
    big = HypervisorEvent(agent_did="did:mesh:big", payload={"blob": "x" * 70_000})
    server.emit([small, big])
    events = http.get("/api/events", params={"agent_did": "did:mesh:big"}).json()["events"]
    assert events[0] == small.to_dict()
    assert events[1]["event_id"] == big.event_id
    assert events[1]["payload"]["hvobs_truncated"] > 70_000


def test_status_counts(http: httpx.Client) -> None:
    """/api/status reports the source, the index and the view's counts."""
    status = http.get("/api/status").json()
    assert status["source"] == "test log"
    assert status["events_indexed"] == len(FLEET.events)
    assert status["view"]["agents"] == len(FLEET.agents)
    assert (status["stale_seconds"], status["reader_errors"]) == (None, 0)


def read_stream(
    client: httpx.Client, want: int, headers: dict[str, str] | None = None
) -> list[dict[str, str]]:
    """Read stream messages until ``want`` events arrived (a reset counts as done)."""
    messages: list[dict[str, str]] = []
    got = 0
    with client.stream("GET", "/api/stream", headers=headers or {}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in sse_messages(response.iter_lines()):
            if "event" not in message or message["event"] == "message":
                continue
            messages.append(message)
            if message["event"] == "reset":
                return messages
            got += len(json.loads(message["data"]))
            if got >= want:
                return messages
    return messages


def test_stream_batches_new_events_and_resumes_from_last_event_id(
    server: ServerThread,
) -> None:
    """New events reach a stream client in batches (fewer messages than events), in order;
    a client reconnecting with Last-Event-ID gets exactly the events it missed; an id of
    another server run gets a reset."""
    burst = [HypervisorEvent(agent_did="did:mesh:s", payload={"i": i}) for i in range(500)]
    collected: list[list[dict[str, str]]] = []
    with server.client() as client:
        reader = threading.Thread(target=lambda: collected.append(read_stream(client, 500)))
        reader.start()
        wait_until(lambda: server.runtime and server.runtime.broadcaster.clients, what="client")
        server.emit(burst)
        reader.join(20)
    messages = collected[0]
    received = [e["event_id"] for m in messages for e in json.loads(m["data"])]
    assert received == [e.event_id for e in burst]
    assert len(messages) < len(burst)
    last_id = messages[-1]["id"]
    wait_until(lambda: not server.runtime or not server.runtime.broadcaster.clients)
    missed = [HypervisorEvent(agent_did="did:mesh:s", payload={"i": i}) for i in range(20)]
    server.emit(missed)
    with server.client() as client:
        again = read_stream(client, 20, {"Last-Event-ID": last_id})
    assert [e["event_id"] for m in again for e in json.loads(m["data"])] == [
        e.event_id for e in missed
    ]
    with server.client() as client:
        other = read_stream(client, 1, {"Last-Event-ID": "00000000:5"})
    assert other[0]["event"] == "reset"


def test_stream_from_an_events_page_misses_nothing(server: ServerThread) -> None:
    """The stream_id of an /api/events answer, given as last_event_id, yields exactly the
    events indexed after that answer."""
    with server.client() as client:
        stream_id = client.get("/api/events", params={"limit": 1}).json()["stream_id"]
        later = [HypervisorEvent(agent_did="did:mesh:later") for _ in range(3)]
        server.emit(later)
        messages = read_stream(client, 3, {"Last-Event-ID": stream_id})
    assert [e["event_id"] for m in messages for e in json.loads(m["data"])] == [
        e.event_id for e in later
    ]


def test_server_side_close_ends_streams_and_clients_resume(server: ServerThread) -> None:
    """Closing every stream from the server ends the responses; a client resuming from its
    last id gets what was emitted meanwhile, once."""
    with server.client() as client:
        first = HypervisorEvent(agent_did="did:mesh:c")
        done: list[list[dict[str, str]]] = []

        def follow() -> None:
            messages: list[dict[str, str]] = []
            with client.stream("GET", "/api/stream") as response:
                for message in sse_messages(response.iter_lines()):
                    if message.get("event") == "events":
                        messages.append(message)
            done.append(messages)  # reached only when the server ends the stream

        reader = threading.Thread(target=follow)
        reader.start()
        wait_until(lambda: server.runtime and server.runtime.broadcaster.clients, what="client")
        server.emit([first])
        wait_until(lambda: server.runtime and server.runtime.broadcaster.events_sent)
        server.run(lambda: server.runtime.broadcaster.close_all())  # type: ignore[union-attr]
        reader.join(10)
        assert not reader.is_alive()
        messages = done[0]
        assert [e["event_id"] for e in json.loads(messages[-1]["data"])] == [first.event_id]
        second = HypervisorEvent(agent_did="did:mesh:c")
        server.emit([second])
        resumed = read_stream(client, 1, {"Last-Event-ID": messages[-1]["id"]})
    assert [e["event_id"] for m in resumed for e in json.loads(m["data"])] == [second.event_id]


def test_token_is_required_on_the_api_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a token, /api answers 401 (with WWW-Authenticate) without it or with a wrong one
    and 200 with it; the page and the OpenAPI document stay open; the token appears in no
    log line, uvicorn's access log included."""
    token = "s3cret-token-value"
    caplog.set_level(logging.DEBUG)
    with ServerThread(memory_runtime, token=token, access_log=True) as running:
        access = logging.getLogger("uvicorn.access")
        access.addHandler(caplog.handler)  # uvicorn's loggers do not propagate
        try:
            with running.client() as http:
                missing = http.get("/api/agents")
                assert missing.status_code == 401
                assert missing.headers["www-authenticate"].startswith("Bearer")
                wrong = http.get("/api/agents", headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401
                ok = http.get("/api/agents", headers={"Authorization": f"Bearer {token}"})
                assert ok.status_code == 200
                assert http.get("/").status_code == 200
                document = http.get("/openapi.json").json()
                assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        finally:
            access.removeHandler(caplog.handler)
    logged = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert any("/api/agents" in line and "401" in line for line in logged)
    assert all(token not in r.getMessage() for r in caplog.records)


def test_loopback_server_refuses_foreign_host_headers(http: httpx.Client) -> None:
    """A loopback server answers 400 to a request whose Host is not a loopback name (DNS
    rebinding), and serves loopback names."""
    assert http.get("/api/status", headers={"Host": "evil.example:80"}).status_code == 400
    assert http.get("/api/status", headers={"Host": "localhost:1234"}).status_code == 200


def test_page_and_assets_are_served_with_a_strict_policy(http: httpx.Client) -> None:
    """The page, its script and style are served with a content security policy that allows
    only the server's own script and style."""
    page = http.get("/")
    assert page.status_code == 200
    assert "Saga timeline" in page.text
    assert "Causal spawn tree" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert http.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/static/app.css").status_code == 200
    assert http.get("/static/nope.js").status_code == 404


def test_demo_source_keeps_emitting() -> None:
    """The demo source indexes the fleet's history and keeps emitting new events on its own,
    so the view moves."""

    def demo_runtime() -> ServeRuntime:
        bus = RedisEventBus.in_memory(max_len=10_000, max_events=10_000)
        live = LiveFleet(FLEET, pace_s=0.3)
        return ServeRuntime(bus, source="demo", driver=lambda b: drive(b, live, tick_s=0.05))

    with ServerThread(demo_runtime) as running, running.client() as http:
        history = len(FLEET.events)
        wait_until(
            lambda: http.get("/api/status").json()["events_indexed"] > history + 3,
            timeout=15,
            what="new demo events",
        )
        agents = http.get("/api/agents").json()["agents"]
        assert {a["agent_did"] for a in agents} >= {agent.did for agent in FLEET.agents}


@pytest.mark.redis
def test_serve_over_a_redis_stream(redis_server: RedisServer, stream_name: str) -> None:
    """Over a real redis-server: events emitted before the server started are backfilled,
    events emitted by another bus afterwards reach the API and the stream."""
    history = recent(FLEET)

    async def produce(events: list[HypervisorEvent]) -> None:
        async with RedisEventBus.from_url(redis_server.url, stream_name, reader=False) as bus:
            await bus.emit_many(events)

    asyncio.run(produce(history[:40]))

    def redis_runtime() -> ServeRuntime:
        bus = RedisEventBus.from_url(redis_server.url, stream_name, max_events=10_000)
        return ServeRuntime(bus, source="redis")

    with ServerThread(redis_runtime) as running, running.client() as http:
        assert http.get("/api/status").json()["events_indexed"] == 40
        asyncio.run(produce(history[40:]))
        wait_until(
            lambda: http.get("/api/status").json()["events_indexed"] == len(history),
            what="the rest of the fleet",
        )
        rings = feed_in_process(FLEET).ring.current_rings
        agents = {a["agent_did"]: a["ring"] for a in http.get("/api/agents").json()["agents"]}
        assert agents == {agent.did: rings.get(agent.did) for agent in FLEET.agents}
        root = FLEET.agents[0].trace.trace_id
        assert len(http.get(f"/api/traces/{root}").json()["nodes"]) == len(FLEET.agents)
        probe = HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED,
            agent_did="did:mesh:probe",
            causal_trace_id=CausalTraceId().full_id,
        )
        got: list[list[dict[str, str]]] = []
        stream_id = http.get("/api/events", params={"limit": 1}).json()["stream_id"]
        reader = threading.Thread(
            target=lambda: got.append(read_stream(http, 1, {"Last-Event-ID": stream_id}))
        )
        reader.start()
        asyncio.run(produce([probe]))
        reader.join(15)
        assert [e["event_id"] for e in json.loads(got[0][0]["data"])] == [probe.event_id]
