"""Least-privilege ACL users (``hvobs acl``) against a real redis-server.

The printed lines are loaded exactly as printed (piped into ``redis-cli``); then every command a
role must not run is tried and refused with ``NOPERM``, and the bus, the readers, the workers and
the operator commands run under their own users, with nothing refused in the server's ACL log.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

from hypervisor.observability._backends import redis_log
from hypervisor.observability._backends.log import TrimPolicy
from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.state import state_prefix
from hypervisor.observability._core.codec import decode_event
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.acl import ROLES, acl_line, acl_rules, roles_granting
from hypervisor.observability.errors import (
    PERMANENT_EXIT_STATUS,
    AclArgumentError,
    BusPermissionError,
    BusUnavailableError,
    PermissionDeniedError,
)
from hypervisor.observability.redis_bus import RedisEventBus
from hypervisor.observability.workers import dlq_name
from redis_server import RedisServer, redis_server_binary

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

GROUPS = ("ring", "spans")
"""The worker groups of the tests, as the compose stack names them."""
DERIVATION = {"ring": "ring-metrics", "spans": "saga-spans"}


def redis_cli() -> str:
    """The redis-cli next to the redis-server binary, or on the PATH."""
    server = redis_server_binary()
    beside = Path(server).with_name("redis-cli") if server else None
    found = str(beside) if beside and beside.exists() else shutil.which("redis-cli")
    if found is None:
        pytest.skip("redis-cli is not installed")
    return found


def load(server: RedisServer, line: str) -> None:
    """Run ``line`` exactly as printed through redis-cli (as the default user) and expect OK."""
    done = subprocess.run(
        [redis_cli(), "-p", str(server.port)],
        input=line + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "OK", (line, done.stdout, done.stderr)


def url_of(server: RedisServer, user: str, password: str) -> str:
    """The server's URL with an ACL user."""
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


class Users:
    """One user per role on one fresh stream, created from ``acl_line`` through redis-cli."""

    def __init__(self, server: RedisServer) -> None:
        tag = uuid.uuid4().hex[:8]
        self.server = server
        self.stream = f"acl:{tag}:events"
        self.dlq = dlq_name(self.stream)
        self.other = f"acl:{tag}:other"
        self.urls: dict[str, str] = {}
        self.names: dict[str, str] = {}
        for role in ROLES:
            user, password = f"{role}-{tag}", f"pw-{role}-{uuid.uuid4().hex}"
            groups = GROUPS if role in ("worker", "admin") else ()
            load(server, acl_line(role, self.stream, user, password, groups=groups))
            self.urls[role] = url_of(server, user, password)
            self.names[role] = user

    def state_key(self, group: str, name: str, stream: str | None = None) -> str:
        """A key of a group's worker state."""
        prefix = state_prefix(stream or self.stream, group, DERIVATION.get(group, group))
        return f"{prefix}:{name}"


@pytest.fixture
def users(redis_server: RedisServer) -> Users:
    """The four role users on a fresh stream of the session's server."""
    return Users(redis_server)


@pytest.fixture
async def admin_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client as the server's unrestricted default user (to set up and inspect)."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def call(url: str, *args: Any) -> Any:
    """Run one command as the URL's user on a fresh connection."""
    client = aioredis.Redis.from_url(url)
    try:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def refused_objects(admin: aioredis.Redis, user: str) -> set[str]:
    """What the server's ACL log recorded as refused to ``user`` (commands or keys)."""
    entries = await admin.execute_command("ACL", "LOG", "128")  # type: ignore[no-untyped-call]
    found: set[str] = set()
    for entry in entries:
        fields = (
            entry if isinstance(entry, dict) else dict(zip(entry[::2], entry[1::2], strict=True))
        )
        fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        if fields["username"] in (user, user.encode()):
            obj = fields["object"]
            found.add(obj.decode() if isinstance(obj, bytes) else str(obj))
    return found


async def assert_refused(url: str, commands: list[tuple[str, ...]]) -> None:
    """Every command fails with NOPERM for the URL's user."""
    client = aioredis.Redis.from_url(url)
    try:
        for command in commands:
            with pytest.raises(rexc.NoPermissionError):
                await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


def dangerous(user: str) -> list[tuple[str, ...]]:
    """Server-wide commands no role may run."""
    return [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "appendonly", "no"),
        ("KEYS", "*"),
        ("DBSIZE",),
        ("INFO",),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", user, "+@all", "~*"),
        ("CLIENT", "LIST"),
        ("CLIENT", "KILL", "ID", "1"),
        ("SELECT", "1"),
        ("SWAPDB", "0", "1"),
        ("SHUTDOWN", "ABORT"),
        ("ACL", "DELUSER", "default"),
        ("BGSAVE",),
        ("REPLICAOF", "NO", "ONE"),
        ("MONITOR",),
        ("SCRIPT", "FLUSH"),
        ("FUNCTION", "FLUSH"),
        ("PUBLISH", "channel", "x"),
    ]


def events(n: int, *, agent: str = "did:mesh:a") -> list[HypervisorEvent]:
    """``n`` ring events of one agent."""
    return [
        HypervisorEvent(
            event_type=EventType.RING_ASSIGNED,
            session_id="s1",
            agent_did=agent,
            payload={"ring": i % 4},
        )
        for i in range(n)
    ]


# -- the lines ---------------------------------------------------------------------------------


def test_rules_derive_keys_from_the_naming_functions() -> None:
    """Key patterns are the stream, ``dlq_name(stream)`` and ``state_prefix(stream, group, ..)``
    with glob metacharacters escaped; every role starts from no commands and no channels."""
    stream = "fleet*[1]?"
    escaped = r"fleet\*\[1\]\?"
    assert acl_rules("producer", stream) == ["resetchannels", "-@all", f"%W~{escaped}", "+xadd"]
    reader = acl_rules("reader", stream)
    assert f"%R~{escaped}" in reader
    assert f"%R~{dlq_name(escaped)}" in reader
    worker = " ".join(acl_rules("worker", stream, ["g?"]))
    group = "g\\?"
    assert f"~{state_prefix(escaped, group, '')}*" in worker
    assert worker.count("(") == 2  # the state selector and the dead-letter selector
    for role in ROLES:
        groups = ["g"] if role in ("worker", "admin") else []
        rules = acl_rules(role, "s", groups)
        assert rules[:2] == ["resetchannels", "-@all"]
        assert not any(rule in ("~*", "allkeys", "+@all", "allcommands") for rule in rules)
    assert roles_granting("xadd") == ("producer", "worker", "admin")
    assert roles_granting("xtrim") == ("admin",)
    assert roles_granting("flushall") == ()


def test_passwords_are_hashed_unless_asked_and_never_echoed() -> None:
    """The default password rule is ``#<sha256>``; ``>password`` only on request; a password
    that cannot be written as plain text is refused without being repeated."""
    hashed = acl_line("producer", "s", "p", "top secret", form="aclfile")
    assert "top secret" not in hashed
    assert f"#{hashlib.sha256(b'top secret').hexdigest()}" in hashed.split()
    assert hashed.startswith("user p reset on #")
    assert ">plain-pw" in acl_line("producer", "s", "p", "plain-pw", plaintext=True).split()
    with pytest.raises(AclArgumentError) as refused:
        acl_line("producer", "s", "p", "two words", plaintext=True)
    assert "two words" not in str(refused.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stream": "a b"}, "whitespace"),
        ({"stream": 'a"b'}, "quotes"),
        ({"stream": "a)"}, "parentheses"),
        ({"stream": ""}, "empty"),
        ({"user": "bad user"}, "user name"),
        ({"role": "root"}, "unknown role"),
        ({"role": "worker"}, "needs --group"),
        ({"groups": ["g"]}, "applies to the worker and admin roles"),
        ({"role": "admin", "groups": ["g", "g"]}, "twice"),
        ({"role": "worker", "groups": ["a b"]}, "group name"),
        ({"password": ""}, "password is empty"),
    ],
)
def test_bad_arguments_are_refused_with_one_line(kwargs: dict[str, Any], message: str) -> None:
    """Arguments that would widen or break the rules raise ``AclArgumentError`` (one line)."""
    arguments: dict[str, Any] = {
        "role": "producer",
        "stream": "s",
        "user": "u",
        "password": "pw",
        "groups": [],
    }
    arguments.update(kwargs)
    with pytest.raises(AclArgumentError, match=message) as refused:
        acl_line(
            arguments["role"],
            arguments["stream"],
            arguments["user"],
            arguments["password"],
            groups=arguments["groups"],
        )
    assert "\n" not in str(refused.value)


def hvobs(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> Any:
    """Run the real ``hvobs`` console script."""
    return subprocess.run(
        [sys.executable, "-m", "hypervisor.observability.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_cli_prints_loadable_lines_and_one_line_errors(redis_server: RedisServer) -> None:
    """``hvobs acl`` reads the password from the environment or stdin (never printing it), its
    output loads through redis-cli, the user works, and bad arguments end with one line, exit 2."""
    stream = f"acl:{uuid.uuid4().hex[:8]}*"  # a glob metacharacter in the name
    user = f"cli-{uuid.uuid4().hex[:8]}"
    done = hvobs(
        "acl", "--role", "producer", "--stream", stream, "--user", user,
        "--password-env", "HVOBS_TEST_PW",
        env={"HVOBS_TEST_PW": "s3cret-from-env"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "s3cret-from-env" not in done.stdout + done.stderr
    load(redis_server, done.stdout.strip())
    url = url_of(redis_server, user, "s3cret-from-env")
    assert anyio.run(call, url, "XADD", stream, "*", "e", "x")
    # The escaped pattern grants the literal name only.
    with pytest.raises(rexc.NoPermissionError):
        anyio.run(call, url, "XADD", stream[:-1] + "x", "*", "e", "x")
    piped = hvobs(
        "acl", "--role", "reader", "--stream", stream, "--user", user, "--password-stdin",
        "--format", "aclfile", stdin="from-stdin\n",
    )  # fmt: skip
    assert piped.returncode == 0
    assert piped.stdout.startswith(f"user {user} reset on #")
    assert hashlib.sha256(b"from-stdin").hexdigest() in piped.stdout
    bad = hvobs("acl", "--role", "producer", "--stream", "a b", "--user", "u", "--password", "p")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("hvobs acl: the stream name 'a b' contains ' '")
    unset = hvobs(
        "acl", "--role", "producer", "--stream", "s", "--user", "u",
        "--password-env", "HVOBS_TEST_UNSET_VARIABLE",
    )  # fmt: skip
    assert unset.returncode == 2
    assert "HVOBS_TEST_UNSET_VARIABLE is not set" in unset.stderr


# -- producer ----------------------------------------------------------------------------------


async def test_producer_can_append_and_nothing_else(
    users: Users, admin_client: aioredis.Redis
) -> None:
    """The producer appends to its stream; every other command class is refused with NOPERM:
    trimming, deleting, another stream, the dead letters, the workers' state, groups, reads,
    scripts and server administration. Nothing it tried changed anything."""
    s, url = users.stream, users.urls["producer"]
    assert await call(url, "XADD", s, "*", "e", "x")
    meta = users.state_key("ring", "meta")
    idx = users.state_key("ring", "idx")
    forbidden: list[tuple[str, ...]] = [
        ("XTRIM", s, "MAXLEN", "0"),
        ("XTRIM", s, "MINID", "99999999999999"),
        ("DEL", s),
        ("UNLINK", s),
        ("XDEL", s, "1-1"),
        ("XSETID", s, "99999999999999-0"),
        ("RENAME", s, users.other),
        ("MOVE", s, "1"),
        ("EXPIRE", s, "1"),
        ("XADD", users.other, "*", "e", "x"),
        ("XADD", users.dlq, "*", "e", "x"),
        ("DEL", users.dlq),
        ("SET", meta, "x"),
        ("DEL", meta),
        ("HSET", meta, "version", "99"),
        ("ZADD", idx, "0", "member"),
        ("RPUSH", users.state_key("ring", "wake"), "1"),
        ("GET", users.state_key("ring", "snap")),
        ("XGROUP", "CREATE", s, "g", "$"),
        ("XGROUP", "DESTROY", s, "ring"),
        ("XGROUP", "SETID", s, "ring", "0"),
        ("XGROUP", "DELCONSUMER", s, "ring", "c"),
        ("XREADGROUP", "GROUP", "ring", "c", "STREAMS", s, ">"),
        ("XACK", s, "ring", "1-1"),
        ("XAUTOCLAIM", s, "ring", "c", "0", "0-0"),
        ("XCLAIM", s, "ring", "c", "0", "1-1"),
        ("XPENDING", s, "ring"),
        ("XREAD", "STREAMS", s, "0"),
        ("XRANGE", s, "-", "+"),
        ("XLEN", s),
        ("XINFO", "STREAM", s),
        ("EVAL", "return 1", "0"),
        ("EVAL_RO", "return 1", "0"),
        ("EVALSHA", hashlib.sha1(b"return 1").hexdigest(), "0"),
        ("SCRIPT", "LOAD", "return 1"),
        ("FCALL", "f", "0"),
        ("SCAN", "0"),
        *dangerous(users.names["producer"]),
    ]
    await assert_refused(url, forbidden)
    assert await admin_client.xlen(s) == 1
    assert not await admin_client.exists(users.other, users.dlq, meta, idx)
    assert not await admin_client.execute_command("XINFO", "GROUPS", s)  # type: ignore[no-untyped-call]


async def test_producer_bus_emits_and_refusals_fail_fast(
    users: Users, admin_client: aioredis.Redis
) -> None:
    """A ``RedisEventBus`` without reader emits (awaited, many, buffered) with the producer user;
    a bus that would read, or emit to another stream, fails at once with ``BusPermissionError``
    naming the user, the command and the roles; retention is switched off after its first
    refusal while appends go on. Nothing else was refused."""
    url, user = users.urls["producer"], users.names["producer"]
    sent = events(30)
    async with RedisEventBus.from_url(url, users.stream, reader=False) as bus:
        await bus.emit(sent[0])
        await bus.emit_many(sent[1:20])
        for event in sent[20:]:
            bus.emit_nowait(event)
        await bus.flush()
        assert (bus.emitted, bus.failed, bus.retries) == (30, 0, 0)
    raw: Any = await admin_client.xrange(users.stream)
    assert [decode_event(fields[b"e"]) for _, fields in raw] == sent

    with anyio.fail_after(20):  # a bound on a hang, not a speed target
        reading = RedisEventBus.from_url(url, users.stream, retry_deadline_s=600.0)
        with pytest.raises(BusPermissionError) as refused:
            await reading.start()
    message = str(refused.value)
    assert f"redis user {user!r} may not run XLEN" in message
    assert "grants it to the reader and admin roles" in message
    assert isinstance(refused.value, BusUnavailableError)
    assert (refused.value.user, refused.value.command) == (user, "xlen")
    assert reading.retries == 0

    async with RedisEventBus.from_url(url, users.other, reader=False) as elsewhere:
        with anyio.fail_after(20):
            with pytest.raises(BusPermissionError, match="XADD"):
                await elsewhere.emit(sent[0])
            with pytest.raises(BusPermissionError, match="2 of the 2 events") as many:
                await elsewhere.emit_many(sent[:2])
            assert many.value.events == tuple(sent[:2])
            assert many.value.stored_unknown is False
            elsewhere.emit_nowait(sent[1])
            with pytest.raises(BusPermissionError, match="1 buffered events"):
                await elsewhere.flush()
        assert elsewhere.retries == 0

    trimming = RedisEventBus.from_url(
        url,
        users.stream,
        retention=TrimPolicy(max_len=5, approximate=False),
        log_options={"trim_interval_s": 0.0},
        reader=False,
    )
    async with trimming:
        for event in events(3):
            await trimming.emit(event)
        log = trimming.log
        assert isinstance(log, RedisStreamLog)
        assert log.trim_errors == 1
    assert await admin_client.xlen(users.stream) == 33
    assert await refused_objects(admin_client, user) == {"xlen", "script|load", users.other}


# -- reader ------------------------------------------------------------------------------------


async def test_reader_is_read_only(users: Users, admin_client: aioredis.Redis) -> None:
    """The reader reads the stream and the dead letters; it can write nothing, run no script
    (not even a read-only one), use no consumer group and read no other key."""
    s, url = users.stream, users.urls["reader"]
    await admin_client.xadd(s, {"e": b"x"})
    assert len(await call(url, "XRANGE", s, "-", "+")) == 1
    assert await call(url, "XLEN", users.dlq) == 0
    await assert_refused(
        url,
        [
            ("XADD", s, "*", "e", "x"),
            ("XADD", users.dlq, "*", "e", "x"),
            ("XTRIM", s, "MAXLEN", "0"),
            ("XDEL", s, "1-1"),
            ("DEL", s),
            ("XGROUP", "CREATE", s, "g", "$"),
            ("XREADGROUP", "GROUP", "g", "c", "STREAMS", s, ">"),
            ("XACK", s, "g", "1-1"),
            ("XINFO", "GROUPS", s),
            ("EVAL", "return 1", "0"),
            ("EVAL_RO", "return redis.call('XLEN', KEYS[1])", "1", s),
            ("EVALSHA_RO", hashlib.sha1(b"return 1").hexdigest(), "0"),
            ("SCRIPT", "LOAD", "return 1"),
            ("XRANGE", users.other, "-", "+"),
            ("GET", users.state_key("ring", "snap")),
            ("HGETALL", users.state_key("ring", "meta")),
            ("SCAN", "0"),
            *dangerous(users.names["reader"]),
        ],
    )


async def test_reader_bus_tails_and_queries_without_scripts(
    users: Users, admin_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``RedisEventBus`` used only to tail and query runs with the reader user: backfill of
    the newest ``max_events`` (walking ids from either end of the stream), live tailing into
    subscribers, queries, ``sync()`` and ``index_lag()``; emitting is refused at once. The
    server saw no command of it refused but that emit."""
    monkeypatch.setattr(redis_log, "_PAGE", 7)  # walks across several pages
    sent = events(60)
    async with RedisEventBus.from_url(users.urls["producer"], users.stream, reader=False) as bus:
        await bus.emit_many(sent)
    url, user = users.urls["reader"], users.names["reader"]
    for max_events in (25, 45, None):  # newest-first walk, oldest-first walk, everything
        async with RedisEventBus.from_url(url, users.stream, max_events=max_events) as reader:
            keep = sent[-max_events:] if max_events else sent
            assert await reader.all_events() == keep
    async with (
        RedisEventBus.from_url(url, users.stream, max_events=20) as reader,
        RedisEventBus.from_url(users.urls["producer"], users.stream, reader=False) as producer,
    ):
        seen: list[HypervisorEvent] = []
        reader.subscribe(None, seen.append)
        live = events(5, agent="did:mesh:live")
        await producer.emit_many(live)
        await reader.sync()
        assert seen == live
        assert await reader.query(agent_did="did:mesh:live") == live
        assert await reader.event_count() == 20
        lag = await reader.index_lag()
        assert (lag.entries, lag.applied_id) == (0, lag.head_id)
        with anyio.fail_after(20):
            with pytest.raises(BusPermissionError, match=f"redis user '{user}' may not run XADD"):
                await reader.emit(live[0])
    assert await refused_objects(admin_client, user) == {"xadd"}


async def test_id_walks_match_the_stream_at_every_position(
    redis_server: RedisServer, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``id_from_end`` and ``count_after`` (plain read commands, paged) give the n-th newest id
    and the count after an id for every n and id, across page boundaries, empty stream too."""
    monkeypatch.setattr(redis_log, "_PAGE", 4)
    async with RedisStreamLog(redis_server.url, stream_name) as log:
        assert await log.id_from_end(5) is None
        assert await log.count_after("0-0", 10) == 0
        ids = await log.append_many([b"x"] * 23)
        for n in range(0, 27):
            expected = ids[-n] if 1 <= n <= len(ids) else ids[0] if n else ids[-1]
            assert await log.id_from_end(n) == expected, n
        for index, after in enumerate(["0-0", *ids]):
            for limit in (1, 5, 100):
                assert await log.count_after(after, limit) == min(limit, len(ids) - index)


# -- workers and operators ---------------------------------------------------------------------


async def test_worker_role_is_confined(users: Users, admin_client: aioredis.Redis) -> None:
    """The worker may not append to, trim, delete or reposition the stream, destroy a group,
    touch another group's or stream's state, run a script by its source, or administer the
    server; it may use its own groups' state and the dead letters."""
    s, url = users.stream, users.urls["worker"]
    await admin_client.xadd(s, {"e": b"x"})
    assert await call(url, "XGROUP", "CREATE", s, "ring", "0")
    assert await call(url, "XADD", users.dlq, "*", "e", "x")
    assert await call(url, "HSET", users.state_key("spans", "meta"), "version", "0") == 1
    await assert_refused(
        url,
        [
            ("XADD", s, "*", "e", "x"),
            ("XTRIM", s, "MAXLEN", "0"),
            ("XDEL", s, "1-1"),
            ("DEL", s),
            ("XSETID", s, "99999999999999-0"),
            ("XGROUP", "DESTROY", s, "ring"),
            ("XGROUP", "SETID", s, "ring", "$"),
            ("XTRIM", users.dlq, "MAXLEN", "0"),
            ("DEL", users.dlq),
            ("XADD", users.other, "*", "e", "x"),
            ("XREADGROUP", "GROUP", "g", "c", "STREAMS", users.other, ">"),
            ("SET", users.state_key("other", "meta"), "x"),
            ("GET", state_prefix(users.other, "ring", "ring-metrics") + ":snap"),
            ("HSET", users.stream, "f", "v"),
            ("EVAL", "return 1", "0"),
            ("SCAN", "0"),
            *dangerous(users.names["worker"]),
        ],
    )


async def test_admin_role_is_confined_to_its_stream(
    users: Users, admin_client: aioredis.Redis
) -> None:
    """The admin trims, deletes, destroys groups and deletes state on its stream, and is
    refused everything on other keys and every server-wide command."""
    s, url = users.stream, users.urls["admin"]
    for _ in range(3):
        await admin_client.xadd(s, {"e": b"x"})
    await admin_client.xgroup_create(s, "ring", "0")
    await admin_client.set(users.state_key("ring", "snap"), b"x")
    assert await call(url, "XTRIM", s, "MAXLEN", "1") == 2
    assert await call(url, "XGROUP", "DESTROY", s, "ring") == 1
    assert await call(url, "DEL", users.state_key("ring", "snap")) == 1
    await assert_refused(
        url,
        [
            ("XADD", users.other, "*", "e", "x"),
            ("DEL", users.other),
            ("SET", users.state_key("other", "meta"), "x"),
            ("RENAME", s, users.other),
            *dangerous(users.names["admin"]),
        ],
    )


async def test_admin_retention_trims_where_a_producer_may_not(
    users: Users, admin_client: aioredis.Redis
) -> None:
    """Retention (``max_len``) runs under the admin user: its bus trims the stream."""
    async with RedisEventBus.from_url(
        users.urls["admin"],
        users.stream,
        retention=TrimPolicy(max_len=5, approximate=False),
        log_options={"trim_interval_s": 0.0},
        reader=False,
    ) as bus:
        for event in events(12):
            await bus.emit(event)
        log = bus.log
        assert isinstance(log, RedisStreamLog)
        assert (log.trim_errors, log.trimmed) == (0, 7)
    assert await admin_client.xlen(users.stream) == 5
    assert await refused_objects(admin_client, users.names["admin"]) == set()


def test_permission_error_is_a_project_error() -> None:
    """``BusPermissionError`` is both a ``BusUnavailableError`` and a ``PermissionDeniedError``
    carrying user and command."""
    error = BusPermissionError("m", user="u", command="xadd")
    assert isinstance(error, BusUnavailableError)
    assert isinstance(error, PermissionDeniedError)
    assert (error.user, error.command, str(error)) == ("u", "xadd", "m")


@pytest.mark.slow
def test_workers_and_operator_commands_run_under_their_roles(users: Users, tmp_path: Path) -> None:
    """``hvobs worker ring-metrics`` and ``saga-spans`` processes with the worker user (URL from
    ``HVOBS_REDIS_URL``) consume, apply, commit and dead-letter what a producer-user bus wrote
    (with a garbage entry): the scraped metrics and the exported spans equal the in-process
    reference. ``hvobs dlq list`` works for the reader, ``dlq replay`` and ``--reset-state`` for
    the admin; the worker user is refused both with a one-line error. Nothing the workers ran
    was refused by the server."""
    from worker_procs import WorkerProc, expected_samples, scrape, settled
    from workers_support import random_events, reference

    server = users.server
    stream = users.stream
    sent = random_events(random.Random(909), 400)

    async def produce() -> None:
        async with RedisEventBus.from_url(users.urls["producer"], stream, reader=False) as bus:
            await bus.emit_many(sent[:200])
        await call(users.urls["producer"], "XADD", stream, "*", "e", b"\x00garbage")
        async with RedisEventBus.from_url(users.urls["producer"], stream, reader=False) as bus:
            await bus.emit_many(sent[200:])

    def worker(kind: str, group: str, url: str, *extra: str, name: str = "1") -> WorkerProc:
        argv = [
            sys.executable, "-m", "hypervisor.observability.cli", "worker", kind,
            "--stream", stream, "--group", group, "--consumer", f"{group}-{name}",
            "--metrics-port", "0", "--block", "0.2", "--claim-interval", "0.2", *extra,
        ]  # fmt: skip
        os.environ["HVOBS_REDIS_URL"] = url
        try:
            return WorkerProc(argv)
        finally:
            del os.environ["HVOBS_REDIS_URL"]

    # Scripts load under the worker user too (as after a server restart), not only run.
    assert anyio.run(call, server.url, "SCRIPT", "FLUSH")
    spans_file = tmp_path / "spans.jsonl"
    ring = worker("ring-metrics", "ring", users.urls["worker"])
    # A second worker of the group: one of them stages while the other holds the lease, so
    # the notification path runs too.
    ring_2 = worker("ring-metrics", "ring", users.urls["worker"], name="2")
    spans = worker("saga-spans", "spans", users.urls["worker"], "--jsonl", str(spans_file))
    try:
        anyio.run(produce)
        anyio.run(settled, server.url, stream, "ring", "ring-metrics")
        anyio.run(settled, server.url, stream, "spans", "saga-spans")
        expected = reference(sent)
        got = scrape(ring)
        for name, samples in expected_samples(expected).items():
            assert got.get(name, {}) == samples, name
        assert ring.terminate() == 0
        assert ring_2.terminate() == 0
        assert spans.terminate() == 0
    finally:
        for proc in (ring, ring_2, spans):
            proc.close()
    exported = {line for line in spans_file.read_text().splitlines()}
    assert len(exported) == len(expected.spans) > 10

    async def worker_refusals() -> set[str]:
        client = aioredis.Redis.from_url(server.url)
        try:
            return await refused_objects(client, users.names["worker"])
        finally:
            await client.aclose()

    assert anyio.run(worker_refusals) == set()

    listing = hvobs("dlq", "list", "--redis", users.urls["reader"], "--stream", stream)
    assert listing.returncode == 0, listing.stderr
    letters = listing.stdout.splitlines()
    assert len(letters) == 2  # the garbage entry, dead-lettered once by each group
    assert all('"reason":"undecodable"' in letter for letter in letters)

    denied = hvobs("dlq", "replay", "--redis", users.urls["worker"], "--stream", stream)
    assert denied.returncode == PERMANENT_EXIT_STATUS  # a refusal: restarting cannot help
    assert denied.stderr.count("\n") == 1
    assert f"redis user '{users.names['worker']}' may not run XGROUP|CREATE" in denied.stderr
    replayed = hvobs("dlq", "replay", "--redis", users.urls["admin"], "--stream", stream)
    assert replayed.returncode == 0, replayed.stderr
    # One garbage entry dead-lettered by both groups: replayed once, the other letter settled.
    assert "replayed 1 dead letters (1 duplicate letters" in replayed.stderr

    snap = users.state_key("ring", "snap")
    assert anyio.run(call, server.url, "EXISTS", snap) == 1
    refused = hvobs(
        "worker", "ring-metrics", "--redis", users.urls["worker"], "--stream", stream,
        "--group", "ring", "--reset-state", "--metrics-port", "0",
    )  # fmt: skip
    assert refused.returncode == PERMANENT_EXIT_STATUS
    assert refused.stderr.splitlines()[-1].startswith(
        f"hvobs: reset: redis user '{users.names['worker']}' may not run SCAN"
    )
    reset = worker("ring-metrics", "ring", users.urls["admin"], "--reset-state")
    try:
        assert anyio.run(call, server.url, "EXISTS", snap) == 0
        assert reset.terminate() == 0
    finally:
        reset.close()
    # The events, the garbage entry and the one replayed copy of it.
    assert anyio.run(call, server.url, "XLEN", stream) == len(sent) + 1 + 1


def test_shipped_acl_file_loads_on_a_real_server() -> None:
    """deploy/redis/users.acl loads into a real redis-server: an unauthenticated client may only
    PING (the compose health check), and each compose user works with its development password
    within its role and is refused outside it."""
    acl_file = Path(__file__).resolve().parent.parent / "deploy/redis/users.acl"
    with RedisServer("--aclfile", str(acl_file)) as server:

        def dev(role: str) -> str:
            return url_of(server, role, f"hvobs-dev-{role}")

        async def check() -> None:
            anonymous = f"redis://127.0.0.1:{server.port}/0"
            assert await call(anonymous, "PING") in (b"PONG", "PONG", True)
            await assert_refused(anonymous, [("XLEN", "hvobs:events"), ("ACL", "LIST")])
            assert await call(dev("producer"), "XADD", "hvobs:events", "*", "e", "x")
            assert await call(dev("reader"), "XLEN", "hvobs:events") == 1
            assert await call(dev("worker"), "XGROUP", "CREATE", "hvobs:events", "ring", "0")
            assert await call(dev("admin"), "XTRIM", "hvobs:events", "MAXLEN", "0") == 1
            await assert_refused(dev("producer"), [("XADD", "other", "*", "e", "x")])
            await assert_refused(dev("worker"), [("XADD", "hvobs:events", "*", "e", "x")])

        anyio.run(check)
