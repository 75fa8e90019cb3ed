"""Real redis-server processes for tests and benchmarks: free port, own directory, own config.

``RedisServer`` starts ``redis-server`` bound to 127.0.0.1 on a free port with its working
directory in a temporary folder, waits until it answers ``PING``, and can be killed with SIGKILL
and restarted on the same port and directory (so AOF files survive). Nothing here talks to the
machine's shared Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "RedisServer",
    "free_port",
    "redis_server_binary",
    "redis_server_version",
    "replicated_servers",
    "server_info",
    "wait_until",
]


def redis_server_binary() -> str | None:
    """Return the path of the ``redis-server`` binary, or ``None`` when it is not installed."""
    return os.environ.get("HVOBS_REDIS_SERVER") or shutil.which("redis-server")


def redis_server_version(binary: str | None = None) -> tuple[int, int, int] | None:
    """Return the version of the ``redis-server`` binary (``v=7.0.15`` → ``(7, 0, 15)``)."""
    binary = binary or redis_server_binary()
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    for word in out.split():
        if word.startswith("v="):
            major, minor, patch = (int(part) for part in word[2:].split(".")[:3])
            return major, minor, patch
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    # "-LOADING ..." while an AOF is replayed: not ready yet.
    return reply.startswith(b"+PONG")


class RedisServer:
    """A redis-server child process on a free port in its own directory.

    Args:
        *args: extra ``redis-server`` arguments, e.g. ``"--appendonly", "yes"``.
        directory: working directory (AOF/RDB files); a fresh temporary one by default.
        port: the port; a free one by default.
    """

    def __init__(self, *args: str, directory: Path | None = None, port: int | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.args = list(args)
        self._own_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="hvobs-redis-"))
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> Self:
        """Start the server and wait until it answers ``PING``."""
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.directory / "redis.log"),
            *self.args,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read() if self.process.stderr else b""
                log = self.directory / "redis.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(
                    f"redis-server exited: {err.decode(errors='replace')}{tail}".strip()
                )
            if _ping(self.port, 0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not become ready")

    def kill(self) -> None:
        """Kill the server with SIGKILL (no shutdown, no final save) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        # The stderr pipe is read only when the server dies on start; a restart replaces the
        # process, so the old pipe is closed here rather than left to the garbage collector.
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def restart(self, timeout_s: float = 30.0) -> Self:
        """Start again on the same port and directory (after ``kill`` or ``stop``)."""
        self.kill()
        return self.start(timeout_s)

    def stop(self) -> None:
        """Terminate the server and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._close_pipe()

    def close(self) -> None:
        """Stop the server and remove its directory if this object created it."""
        self.stop()
        if self._own_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.directory)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_until(condition: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``check`` until it holds; fail naming ``condition`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not {condition} within {timeout_s} s")


def server_info(url: str, section: str) -> dict[str, str]:
    """One ``INFO`` section of the server at ``url``, values as strings."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return {k: str(v) for k, v in client.info(section).items()}
    finally:
        client.close()


@contextlib.contextmanager
def replicated_servers() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and one replica of it, the link up."""
    with (
        RedisServer() as primary,
        RedisServer("--replicaof", "127.0.0.1", str(primary.port)) as replica,
    ):
        wait_until(
            "replica linked",
            lambda: (
                server_info(replica.url, "replication").get("master_link_status") == "up"
                and server_info(primary.url, "replication").get("connected_slaves") == "1"
            ),
        )
        yield primary, replica
