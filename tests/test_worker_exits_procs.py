"""``hvobs worker`` processes stop promptly at SIGTERM in every state, and end at once with
status 78 and one line on a refusal that retrying cannot fix.

States: never connected (the server closes every connection; the server accepts and never
answers), Redis killed while the worker runs, Redis SIGSTOPped while the worker runs (every
call hangs until its socket timeout). Refusals: wrong password, unknown database, a user the
ACL denies the stream, a password changed while the worker runs, TLS verification failures.
Deadlines are generous (the machine is shared); none is a timing assertion tighter than 10 s.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import redis

from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.errors import PERMANENT_EXIT_STATUS
from hypervisor.observability.redis_bus import RedisEventBus
from redis_server import RedisServer, free_port
from tls_support import TlsFiles, TlsRedis, make_tls_files, openssl_available, start_tls_redis
from worker_procs import WorkerProc, child_env, cli, procs as procs, worker_argv

pytestmark = [pytest.mark.redis, pytest.mark.slow]

STOP_DEADLINE_S = 10.0
"""How long a SIGTERMed worker may take to exit (its drain is bounded by 3 s)."""
REFUSAL_DEADLINE_S = 30.0
"""How long a refused worker may take to exit: half its --connect-timeout, so a worker that
retried the refusal would be caught."""


class FakeServer:
    """A TCP listener on a free loopback port that counts connections and either closes each
    at once (``answer="close"``: Redis down behind a proxy) or holds it without a word
    (``answer="hang"``: a stopped server)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                continue
            self.accepted += 1
            if self.answer == "close":
                connection.close()
            else:
                self._held.append(connection)

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._done.set()
        self._thread.join(timeout=10)
        for connection in self._held:
            connection.close()
        self._listener.close()


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Started:
    """An ``hvobs`` child process whose stderr goes to a file (read after it exits)."""

    def __init__(self, argv: list[str]) -> None:
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stderr())
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=self._err, env=child_env()
        )

    def terminate_within(self, timeout_s: float) -> int:
        """SIGTERM it and return its exit status; fail when it is still running after
        ``timeout_s`` (it is then killed)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float) -> int:
        """Its exit status; fail (and kill it) when it runs longer than ``timeout_s``."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"still running {timeout_s:g} s later:\n{self.stderr()}") from None

    def stderr(self) -> str:
        """What it wrote on stderr so far."""
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def close(self) -> None:
        """Kill it if it still runs and close its log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._err.close()


@pytest.fixture
def started() -> Iterator[list[Started]]:
    """Processes started by a test, killed at its end whatever happens."""
    found: list[Started] = []
    yield found
    for each in found:
        each.close()


def _worker(url: str, *extra: str) -> list[str]:
    return worker_argv(
        "ring-metrics", url, f"x{uuid.uuid4().hex[:8]}", "c0", "--connect-timeout", "60", *extra
    )


@pytest.mark.parametrize("answer", ["close", "hang"])
def test_sigterm_stops_a_worker_that_never_connected(answer: str, started: list[Started]) -> None:
    """A worker still waiting for Redis at start (connections closed at once, or held without
    an answer) exits 0 at SIGTERM, long before its 60 s connect timeout."""
    server = FakeServer(answer)
    try:
        worker = Started(_worker(f"redis://127.0.0.1:{server.port}/0"))
        started.append(worker)
        # "close": two connections means it is in its retry loop; "hang": one is held.
        _wait_for(lambda: server.accepted >= (2 if answer == "close" else 1), "a connection")
        assert worker.terminate_within(STOP_DEADLINE_S) == 0, worker.stderr()
    finally:
        server.close()


def _healthz(worker: WorkerProc) -> dict[str, object]:
    _, body = worker.get("/healthz")
    document: dict[str, object] = json.loads(body)
    return document


def test_sigterm_stops_a_worker_whose_redis_died(procs: list[WorkerProc]) -> None:
    """Redis killed under a running worker: once the worker reports itself disconnected,
    SIGTERM ends it with status 0 (it does not wait for Redis to come back)."""
    with RedisServer() as server:
        worker = WorkerProc(_worker(server.url))
        procs.append(worker)
        _wait_for(lambda: _healthz(worker).get("connected") is True, "the worker connected")
        server.kill()
        _wait_for(lambda: _healthz(worker).get("connected") is False, "a lost connection")
        started_at = time.monotonic()
        assert worker.terminate() == 0
        assert time.monotonic() - started_at < STOP_DEADLINE_S


def _emit(url: str, stream: str, count: int) -> None:
    async def emit() -> None:
        async with RedisEventBus.from_url(url, stream, reader=False) as bus:
            for index in range(count):
                await bus.emit(
                    HypervisorEvent(
                        event_type=EventType.RING_ASSIGNED,
                        agent_did=f"did:a{index % 7}",
                        session_id="s",
                        payload={"ring": 2},
                    )
                )

    anyio.run(emit)


def test_sigterm_stops_a_worker_whose_redis_hangs(procs: list[WorkerProc]) -> None:
    """Redis SIGSTOPped under a running worker that has events to process: every call hangs
    until its socket timeout, and SIGTERM still ends the worker within the drain timeout (the
    drain is cut short and says so), status 0."""
    with RedisServer() as server:
        stream = f"h{uuid.uuid4().hex[:8]}"
        worker = WorkerProc(
            worker_argv("ring-metrics", server.url, stream, "c0", "--drain-timeout", "2")
        )
        procs.append(worker)
        _emit(server.url, stream, 300)
        _wait_for(lambda: int(str(_healthz(worker).get("events", 0))) > 0, "events processed")
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            worker.proc.send_signal(signal.SIGTERM)
            code = worker.proc.wait(timeout=STOP_DEADLINE_S)
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert code == 0


def _refused(started: list[Started], argv: list[str]) -> tuple[int, list[str]]:
    worker = Started(argv)
    started.append(worker)
    code = worker.wait(REFUSAL_DEADLINE_S)
    return code, worker.stderr().splitlines()


@pytest.fixture
def password_server() -> Iterator[RedisServer]:
    """A redis-server whose default user needs the password ``right-pw``, and a user
    ``keyless`` (password ``right-pw``) that may run every command on no key."""
    with RedisServer() as server:
        admin = redis.Redis(port=server.port)
        try:
            admin.acl_setuser("keyless", enabled=True, passwords=["+right-pw"], commands=["+@all"])
            admin.config_set("requirepass", "right-pw")
        finally:
            admin.close()
        yield server


@pytest.mark.parametrize(
    ("credentials", "database", "words"),
    [
        (":wrong-pw", "0", "refused the credentials of user 'default'"),
        (":right-pw", "99", "has no such database (DB index is out of range)"),
        ("keyless:right-pw", "0", "redis user 'keyless' may not run XGROUP|CREATE"),
    ],
    ids=["wrong-password", "unknown-database", "acl-denied"],
)
def test_refusal_exits_78_with_one_line(
    password_server: RedisServer,
    started: list[Started],
    credentials: str,
    database: str,
    words: str,
) -> None:
    """Wrong password, unknown database, a user the ACL denies the stream: the worker exits
    78 with one line naming the cause and host:port (never the password), well before its
    60 s connect timeout (it did not retry)."""
    port = password_server.port
    url = f"redis://{credentials}@127.0.0.1:{port}/{database}"
    code, lines = _refused(started, _worker(url))
    assert code == PERMANENT_EXIT_STATUS, lines
    assert len(lines) == 1, lines
    assert words in lines[0]
    assert f"127.0.0.1:{port}" in lines[0]
    assert "wrong-pw" not in lines[0]
    assert "right-pw" not in lines[0]


def test_password_changed_under_a_running_worker_exits_78(
    password_server: RedisServer, procs: list[WorkerProc]
) -> None:
    """The password changes and the worker's connections are dropped: its reconnection is
    refused, and it exits 78 with a last line naming the refusal instead of retrying."""
    port = password_server.port
    worker = WorkerProc(_worker(f"redis://:right-pw@127.0.0.1:{port}/0"))
    procs.append(worker)
    _wait_for(lambda: _healthz(worker).get("connected") is True, "the worker connected")
    admin = redis.Redis(port=port, password="right-pw")
    try:
        admin.config_set("requirepass", "new-pw")
        admin.client_kill_filter(_type="normal", skipme=True)
    finally:
        admin.close()
    code = worker.proc.wait(timeout=REFUSAL_DEADLINE_S)
    worker._log.seek(0)  # the worker's stderr (WorkerProc keeps it in this file)
    last = worker._log.read().decode(errors="replace").splitlines()[-1]
    assert code == PERMANENT_EXIT_STATUS, last
    assert last.startswith("hvobs worker ring-metrics: Redis at 127.0.0.1:"), last
    assert "refused the credentials of user 'default'" in last
    assert "right-pw" not in last
    assert "new-pw" not in last


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA, server and client certificates (skips without openssl)."""
    if not openssl_available():
        pytest.skip("openssl is not installed")
    return make_tls_files(Path(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[TlsRedis]:
    """A TLS redis-server (no client certificates asked)."""
    yield from start_tls_redis(tls_files)


@pytest.fixture(scope="module")
def tls_redis_client_certs(tls_files: TlsFiles) -> Iterator[TlsRedis]:
    """A TLS redis-server that requires a client certificate."""
    yield from start_tls_redis(tls_files, client_certs=True)


def _tls_worker_counts(server: TlsRedis, *options: str) -> None:
    """A worker on the TLS port with ``options`` starts and derives what a TLS bus emits."""
    files = server.files
    stream = f"t{uuid.uuid4().hex[:8]}"
    worker = WorkerProc(worker_argv("ring-metrics", server.url(), stream, "c0", *options))
    try:
        client = {"ssl_ca_certs": str(files.ca)}
        if "--tls-cert" in options:
            client |= {"ssl_certfile": str(files.client_cert), "ssl_keyfile": str(files.client_key)}

        async def emit() -> None:
            async with RedisEventBus.from_url(
                server.url(), stream, reader=False, log_options=client
            ) as bus:
                for index in range(20):
                    await bus.emit(
                        HypervisorEvent(
                            event_type=EventType.RING_ASSIGNED,
                            agent_did=f"did:t{index}",
                            session_id="s",
                            payload={"ring": 2},
                        )
                    )

        anyio.run(emit)
        _wait_for(lambda: _healthz(worker).get("events") == 20, "20 events processed")
        assert worker.terminate() == 0
    finally:
        worker.close()


def test_tls_worker_with_the_right_ca(tls_redis: TlsRedis) -> None:
    """``--tls-ca`` with the CA that signed the server: the worker runs on ``rediss://`` and
    processes what a TLS bus emits."""
    _tls_worker_counts(tls_redis, "--tls-ca", str(tls_redis.files.ca))


def test_tls_worker_with_a_client_certificate(tls_redis_client_certs: TlsRedis) -> None:
    """A server that requires client certificates: ``--tls-cert``/``--tls-key`` make it work."""
    files = tls_redis_client_certs.files
    _tls_worker_counts(
        tls_redis_client_certs,
        "--tls-ca", str(files.ca),
        "--tls-cert", str(files.client_cert),
        "--tls-key", str(files.client_key),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("host", "ca", "words"),
    [
        ("127.0.0.1", "other_ca", "TLS certificate verify failed"),
        ("localhost", "ca", "TLS host name mismatch"),
    ],
    ids=["wrong-ca", "wrong-host-name"],
)
def test_tls_verification_failure_exits_78(
    tls_redis: TlsRedis, started: list[Started], host: str, ca: str, words: str
) -> None:
    """A CA that did not sign the server's certificate, or a host name the certificate is not
    for: exit 78 at once, one line naming the check that failed and host:port."""
    ca_file = str(getattr(tls_redis.files, ca))
    code, lines = _refused(started, _worker(tls_redis.url(host), "--tls-ca", ca_file))
    assert code == PERMANENT_EXIT_STATUS, lines
    assert len(lines) == 1, lines
    assert words in lines[0]
    assert f"{host}:{tls_redis.tls_port}" in lines[0]


def test_tls_options_need_a_rediss_url(started: list[Started], tls_files: TlsFiles) -> None:
    """``--tls-ca`` with a ``redis://`` URL is a usage mistake: status 2, one line."""
    code, lines = _refused(
        started, _worker(f"redis://127.0.0.1:{free_port()}/0", "--tls-ca", str(tls_files.ca))
    )
    assert code == 2
    assert lines == [
        "hvobs worker ring-metrics: --tls-ca, --tls-cert and --tls-key need a rediss:// URL "
        "in --redis (got redis://)"
    ]


@pytest.mark.parametrize(
    "command",
    [["dlq", "list"], ["serve", "--port", "0"], ["demo", "--agents", "2", "--sagas", "1"]],
    ids=["dlq", "serve", "demo"],
)
def test_other_commands_take_tls_options(
    tls_redis: TlsRedis, started: list[Started], command: list[str]
) -> None:
    """``hvobs dlq``, ``serve --redis`` and ``demo --redis`` take the TLS options too: a wrong
    CA ends them at once with status 78 and one line naming the failed check and host:port."""
    argv = cli(*command, "--redis", tls_redis.url(), "--tls-ca", str(tls_redis.files.other_ca))
    code, lines = _refused(started, argv)
    assert code == PERMANENT_EXIT_STATUS, lines
    assert len(lines) == 1, lines
    assert "TLS certificate verify failed" in lines[0]
    assert f"127.0.0.1:{tls_redis.tls_port}" in lines[0]


def test_dlq_lists_over_tls(tls_redis: TlsRedis) -> None:
    """``hvobs dlq list`` with the right CA reads the dead letters over TLS (none: status 0)."""
    argv = cli("dlq", "list", "--redis", tls_redis.url(), "--tls-ca", str(tls_redis.files.ca))
    listed = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == ""
