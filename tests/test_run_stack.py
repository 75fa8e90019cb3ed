"""``scripts/run_stack.sh``: every port free before it starts anything (never a Redis it did not
start), and every process it starts alive and listening on its own port before the stack is
reported up; the port checks of ``scripts/stack_check.py`` on real processes and sockets."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_STACK = ROOT / "scripts" / "run_stack.sh"
LISTEN = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen()\n"
    "print('listening', flush=True)\n"
    "time.sleep(60)\n"
)


def _load() -> ModuleType:
    path = ROOT / "scripts" / "stack_check.py"
    spec = importlib.util.spec_from_file_location("stack_check", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stack_check = _load()


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def child() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes started by a test, killed at its end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def spawn(started: list[subprocess.Popen[str]], code: str, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True
    )
    started.append(process)
    return process


def test_a_process_listening_on_its_port_is_bound(child: list[subprocess.Popen[str]]) -> None:
    """A process that listens on its port passes at once; the port then counts as in use."""
    (port,) = free_ports(1)
    process = spawn(child, LISTEN, str(port))
    assert process.stdout is not None
    assert process.stdout.readline() == "listening\n"
    assert stack_check.wait_bound(process.pid, port, timeout_s=10) is None
    assert stack_check.port_in_use("127.0.0.1", port)


def test_a_process_that_exits_or_never_listens_is_not_bound(
    child: list[subprocess.Popen[str]],
) -> None:
    """A process that exits is reported exited (a zombie counts as exited); one alive but
    not listening is reported after the timeout; a port another process holds is named so."""
    (port,) = free_ports(1)
    quitter = spawn(child, "import sys; sys.exit(3)")
    quitter.wait(10)
    assert stack_check.wait_bound(quitter.pid, port, timeout_s=5) == "exited"
    idle = spawn(child, "import time; print('up', flush=True); time.sleep(60)")
    assert idle.stdout is not None
    assert idle.stdout.readline() == "up\n"
    assert stack_check.wait_bound(idle.pid, port, timeout_s=0.3) == "not listening"
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen(1)
        assert stack_check.wait_bound(idle.pid, port, timeout_s=0.3) == "held by another process"
    assert not stack_check.port_in_use("127.0.0.1", port)


def _env(tmp_path: Path, ports: list[int]) -> dict[str, str]:
    redis, sim1, sim2, ring1, ring2, spans, prometheus = ports
    return {
        **os.environ,
        "HVOBS_VENV": str(Path(sys.executable).parent.parent),
        "HVOBS_STACK_DIR": str(tmp_path / "stack"),
        "HVOBS_REDIS_PORT": str(redis),
        "HVOBS_SIM_PORTS": f"{sim1} {sim2}",
        "HVOBS_RING_PORTS": f"{ring1} {ring2}",
        "HVOBS_SPANS_PORT": str(spans),
        "HVOBS_PROMETHEUS_PORT": str(prometheus),
    }


def _needs_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")


@pytest.mark.redis
def test_run_stack_refuses_a_redis_it_did_not_start(tmp_path: Path) -> None:
    """Something already on the Redis port (here a plain socket; a Redis of someone else's
    is the same): one line saying the stack uses only a Redis it starts and which variable
    moves it, exit 1, and nothing started."""
    _needs_redis_server()
    ports = free_ports(7)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports[0]))
        squatter.listen(1)
        result = subprocess.run(
            ["bash", str(RUN_STACK), "--duration", "1"],
            env=_env(tmp_path, ports),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {ports[0]} on 127.0.0.1 is already in use" in lines[0]
    assert "only a Redis it starts itself" in lines[0]
    assert "HVOBS_REDIS_PORT" in lines[0]
    assert "started" not in result.stdout


@pytest.mark.redis
@pytest.mark.slow
def test_run_stack_reports_up_once_every_process_listens_on_its_port(tmp_path: Path) -> None:
    """The whole stack on free ports: each process is reported up on its own port (the
    saga-span worker's /metrics included), in one line printed only after all were checked;
    the run stops cleanly."""
    _needs_redis_server()
    ports = free_ports(7)
    result = subprocess.run(
        ["bash", str(RUN_STACK), "--duration", "1"],
        env=_env(tmp_path, ports),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    up = [line for line in result.stdout.splitlines() if line.startswith("run_stack: up: ")]
    assert len(up) == 1, result.stdout
    listed = dict(re.findall(r"(\S+)=127\.0\.0\.1:(\d+)", up[0]))
    names = ["redis", "simulator-1", "simulator-2", "ring-metrics-1", "ring-metrics-2"]
    names.append("saga-spans")
    expected = dict(zip(names, map(str, ports[:6]), strict=True))
    if shutil.which("prometheus"):
        expected["prometheus"] = str(ports[6])
    assert listed == expected
    started = result.stdout.index("run_stack: started prometheus" if "prometheus" in expected
                                  else "run_stack: started saga-spans")  # fmt: skip
    assert started < result.stdout.index("run_stack: up: ")
