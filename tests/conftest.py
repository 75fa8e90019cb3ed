"""Shared pytest fixtures: the anyio backend, real redis-server processes and a real cluster."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from hypervisor.observability._backends.redis_state import RedisStateStore, state_prefix
from hypervisor.observability._backends.state import MemoryStateStore, StateStore
from redis_cluster import RedisCluster, redis_cli_binary
from redis_server import RedisServer, redis_server_binary, replicated_servers

_REDIS_FIXTURES = ("redis_server", "redis_cluster")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that asks for ``redis_server`` or ``redis_cluster`` without the ``redis``
    marker: under ``-m "not redis"`` (no redis-server installed) it would be skipped instead of
    deselected.
    (A fixture that asks for the server only for some parameters, with ``getfixturevalue``,
    marks those parameters with ``pytest.param(..., marks=pytest.mark.redis)``.)"""
    unmarked = [
        item.nodeid
        for item in items
        if any(name in getattr(item, "fixturenames", ()) for name in _REDIS_FIXTURES)
        and item.get_closest_marker("redis") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests using the redis_server or redis_cluster fixture must be marked redis: "
            + ", ".join(unmarked)
        )


@pytest.fixture
def anyio_backend() -> str:
    """Run anyio tests on asyncio (redis-py's asyncio client needs it)."""
    return "asyncio"


# --- Redis fixtures (stream log and Redis bus tests) ---------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server (no persistence) on a free port for the whole session."""
    if redis_server_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One Redis Cluster (3 masters, 3 replicas, ``cluster-node-timeout`` 2 s) for the whole
    session. Tests that kill or restart nodes call ``heal()`` when done, so the next test finds
    3 masters with a replica each (a former master may now be a replica)."""
    if redis_server_binary() is None or redis_cli_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server or redis-cli is not installed (scripts/test.sh installs it)")
        pytest.skip("redis-server or redis-cli is not installed")
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def replicated() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and one replica of it, the link up (for tests of ``durable=True``)."""
    with replicated_servers() as pair:
        yield pair


@pytest.fixture
def stream_name() -> str:
    """A stream key unique to the test, so tests sharing a server never see each other."""
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """A fresh state store of each kind (the state store contract runs on both; the Redis one
    on the session's redis-server, under a key prefix of its own)."""
    if request.param == "memory":
        yield MemoryStateStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = state_prefix(f"t{uuid.uuid4().hex[:8]}", "g", "ring")
    async with RedisStateStore(server.url, prefix) as made:
        yield made
        await made.reset()
