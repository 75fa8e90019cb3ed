"""What a Redis client of this package says when it cannot work: the host, the port and the
cause, never the password; and which failures are transient (``LogUnavailableError``, retried)
and which are permanent (``LogPermanentError``, never retried), against real servers: a
refusing port, a port that never answers, a server with a password, a TLS server."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from hypervisor.observability._backends.redis_log import RedisStreamLog
from hypervisor.observability._backends.redis_state import RedisStateStore
from hypervisor.observability.errors import (
    LogError,
    LogPermanentError,
    LogPermissionError,
    LogUnavailableError,
)
from hypervisor.observability.workers import RingMetricsDerivation, Worker, WorkerConfig
from redis_server import RedisServer, free_port, redis_server_binary
from tls_support import TlsFiles, TlsRedis, make_tls_files, openssl_available, start_tls_redis

pytestmark = pytest.mark.anyio

PASSWORD = "pw-never-shown-9f3a"


async def _failure(url: str, **options: Any) -> LogError:
    """The error of a first call on a fresh log at ``url`` (a short timeout)."""
    async with RedisStreamLog(url, connect_timeout_s=2, socket_timeout_s=1, **options) as log:
        with pytest.raises(LogError) as caught:
            await log.server_version()
    return caught.value


def _redis_or_skip() -> None:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    """A redis-server whose default user needs a password, with an ACL user that may run
    nothing on any key."""
    _redis_or_skip()
    with RedisServer() as server:
        admin = redis.Redis(port=server.port)
        try:
            admin.acl_setuser(
                "keyless", enabled=True, passwords=[f"+{PASSWORD}"], commands=["+@all"]
            )
            admin.config_set("requirepass", PASSWORD)  # after: the server answers PING until now
        finally:
            admin.close()
        yield server


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA, server and client certificates (skips without openssl)."""
    if not openssl_available():
        pytest.skip("openssl is not installed")
    return make_tls_files(Path(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[TlsRedis]:
    """A TLS redis-server that does not ask for client certificates."""
    _redis_or_skip()
    yield from start_tls_redis(tls_files)


@pytest.fixture(scope="module")
def tls_redis_client_certs(tls_files: TlsFiles) -> Iterator[TlsRedis]:
    """A TLS redis-server that requires a client certificate signed by the test CA."""
    _redis_or_skip()
    yield from start_tls_redis(tls_files, client_certs=True)


async def test_refused_port_is_transient_and_named() -> None:
    """Nothing listening: a transient error naming host:port and "connection refused", without
    the URL's password."""
    port = free_port()
    error = await _failure(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    assert type(error) is LogUnavailableError
    assert f"127.0.0.1:{port}" in str(error)
    assert "connection refused" in str(error)
    assert PASSWORD not in str(error)


async def test_silent_port_is_transient_timed_out() -> None:
    """A port that accepts connections and never answers (a stopped server): transient,
    "timed out", host:port named."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        error = await _failure(f"redis://127.0.0.1:{port}/0")
    assert type(error) is LogUnavailableError
    assert "timed out" in str(error)
    assert f"127.0.0.1:{port}" in str(error)


async def test_unknown_host_is_transient_and_named() -> None:
    """A host name that does not resolve (the reserved .invalid domain): transient (DNS may
    come back), "host name not resolved", the host named."""
    error = await _failure("redis://no-such-host.invalid:6379/0")
    assert type(error) is LogUnavailableError
    assert "host name not resolved" in str(error)
    assert "no-such-host.invalid:6379" in str(error)


@pytest.mark.redis
async def test_a_write_to_a_replica_is_transient(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    """A replica refuses the write (``READONLY``, what a failed-over primary answers): the
    retryable ``LogUnavailableError`` naming the server, not a permanent error (redis-py drops
    the error's code from its text, so the class decides)."""
    _, replica = replicated
    async with RedisStreamLog(replica.url, "readonly") as log:
        with pytest.raises(LogUnavailableError) as caught:
            await log.append_many([b"x"])
    assert f"127.0.0.1:{replica.port}" in str(caught.value)
    assert "read only replica" in str(caught.value)


@pytest.mark.redis
async def test_wrong_password_is_permanent(password_server: RedisServer) -> None:
    """A wrong password: permanent (cause ``authentication``), naming the user, host and port,
    and never the password given."""
    wrong = "wrong-pw-7c1d"
    url = f"redis://:{wrong}@127.0.0.1:{password_server.port}/0"
    error = await _failure(url)
    assert isinstance(error, LogPermanentError)
    assert error.cause == "authentication"
    assert error.location == f"127.0.0.1:{password_server.port}"
    assert "refused the credentials of user 'default'" in str(error)
    assert wrong not in str(error)
    assert PASSWORD not in str(error)


@pytest.mark.redis
async def test_unknown_database_is_permanent(password_server: RedisServer) -> None:
    """A database number beyond the server's ``databases``: permanent (cause ``database``)."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{password_server.port}/99"
    error = await _failure(url)
    assert isinstance(error, LogPermanentError)
    assert error.cause == "database"
    assert "DB index is out of range" in str(error)
    assert f"127.0.0.1:{password_server.port}" in str(error)


@pytest.mark.redis
async def test_acl_denial_names_where(password_server: RedisServer) -> None:
    """An ACL refusal (a user with no key pattern) names the user, the command and the server;
    it is a ``LogPermissionError``, which no loop retries."""
    url = f"redis://keyless:{PASSWORD}@127.0.0.1:{password_server.port}/0"
    async with RedisStreamLog(url, "t:acl") as log:
        with pytest.raises(LogPermissionError) as caught:
            await log.ensure_group("g")
    text = str(caught.value)
    assert "redis user 'keyless' may not run XGROUP|CREATE" in text
    assert f"at Redis 127.0.0.1:{password_server.port}" in text
    assert PASSWORD not in text


@pytest.mark.redis
async def test_state_store_names_its_server(password_server: RedisServer) -> None:
    """The workers' state store translates the same way and names its server too."""
    url = f"redis://:wrong@127.0.0.1:{password_server.port}/0"
    async with RedisStateStore(url, "t:state") as store:
        with pytest.raises(LogPermanentError) as caught:
            await store.backlog()
    assert caught.value.location == f"127.0.0.1:{password_server.port}"


@pytest.mark.redis
async def test_tls_with_the_right_ca_connects(tls_redis: TlsRedis) -> None:
    """The right CA: the TLS connection works and entries go in and come out."""
    async with RedisStreamLog(
        tls_redis.url(), "t:tls", ssl_ca_certs=str(tls_redis.files.ca)
    ) as log:
        ids = await log.append_many([b"one", b"two"])
        assert [entry.data for entry in await log.read("0", 10)] == [b"one", b"two"]
    assert len(ids) == 2


@pytest.mark.redis
async def test_tls_wrong_ca_is_permanent_verify_failure(tls_redis: TlsRedis) -> None:
    """A CA that did not sign the server's certificate: permanent, cause ``tls-verify``,
    "certificate verify failed", host:port named."""
    error = await _failure(tls_redis.url(), ssl_ca_certs=str(tls_redis.files.other_ca))
    assert isinstance(error, LogPermanentError)
    assert error.cause == "tls-verify"
    assert "TLS certificate verify failed" in str(error)
    assert f"127.0.0.1:{tls_redis.tls_port}" in str(error)


@pytest.mark.redis
async def test_tls_host_name_mismatch_is_its_own_cause(tls_redis: TlsRedis) -> None:
    """The server's certificate is for 127.0.0.1 only: reached as ``localhost``, the failure
    says "host name mismatch" (cause ``tls-hostname``), not a generic verify failure."""
    error = await _failure(tls_redis.url("localhost"), ssl_ca_certs=str(tls_redis.files.ca))
    assert isinstance(error, LogPermanentError)
    assert error.cause == "tls-hostname"
    assert "TLS host name mismatch" in str(error)
    assert f"localhost:{tls_redis.tls_port}" in str(error)


@pytest.mark.redis
async def test_tls_client_certificate_required(tls_redis_client_certs: TlsRedis) -> None:
    """A server that requires client certificates: without one the connection fails (with
    TLS 1.3 the server's alert comes after the client's handshake, and when the server's reset
    overtakes it only the reset is seen: then the failure is transient; when the alert is read
    the failure is permanent and says what is missing); with the client certificate and key
    it works."""
    server = tls_redis_client_certs
    files = server.files
    error = await _failure(server.url(), ssl_ca_certs=str(files.ca))
    if isinstance(error, LogPermanentError):
        assert error.cause == "tls-handshake"
        assert "requires a client certificate" in str(error)
    else:
        assert "connection reset by the server" in str(error)
    options: dict[str, Any] = {
        "ssl_ca_certs": str(files.ca),
        "ssl_certfile": str(files.client_cert),
        "ssl_keyfile": str(files.client_key),
    }
    async with RedisStreamLog(server.url(), "t:mtls", **options) as log:
        assert await log.server_version() >= (6, 0, 0)


def _ring_worker(
    url: str, timeout_s: float = 1.0, **config: Any
) -> tuple[RedisStreamLog, RedisStateStore, Worker]:
    log = RedisStreamLog(url, "t:worker", connect_timeout_s=timeout_s, socket_timeout_s=timeout_s)
    store = RedisStateStore(url, "t:worker:state", socket_timeout_s=timeout_s)
    worker = Worker(log, [RingMetricsDerivation(store)], WorkerConfig(group="g", **config))
    return log, store, worker


async def test_worker_stop_is_bounded_while_redis_is_silent() -> None:
    """``Worker.run()`` against a port that accepts and never answers (its calls would hang
    for their 60 s socket timeout) returns within the drain timeout of ``stop()``, never
    having connected."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(30)
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        log, store, worker = _ring_worker(url, timeout_s=60, drain_timeout_s=0.5)
        async with log, store, anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            # The worker's first call is connected and waiting for an answer that never comes.
            connection, _ = await anyio.to_thread.run_sync(listener.accept)
            with connection:
                worker.stop()
                with anyio.fail_after(10):
                    await worker.stopped.wait()
                await worker.aclose()
    assert not worker.connected


@pytest.mark.redis
async def test_worker_raises_a_refusal_without_retrying(password_server: RedisServer) -> None:
    """A wrong password: ``Worker.run()`` raises ``LogPermanentError`` at its first attempt
    (no backend error counted as retried) instead of backing off forever."""
    url = f"redis://:wrong@127.0.0.1:{password_server.port}/0"
    log, store, worker = _ring_worker(url)
    async with log, store, worker:
        with anyio.fail_after(30), pytest.raises(LogPermanentError) as caught:
            await worker.run()
    assert caught.value.cause == "authentication"
    assert worker.stats.backend_errors == 0
    assert worker.stopped.is_set()
