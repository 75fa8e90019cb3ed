"""docker-compose.yml, checked without Docker: every program it runs accepts its arguments, every
file it mounts exists, Prometheus scrapes services the file defines, and Redis loads the shipped
ACL file, which is ``hvobs acl``'s output, with each service connecting as its role's user."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from hypervisor.observability.acl import acl_line
from hypervisor.observability.cli import build_parser
from hypervisor.observability.demo.simulate import build_parser as simulator_parser

ROOT = Path(__file__).resolve().parent.parent
# The tutorial's .NET governance service is the user's own; the stack only scrapes it.
EXTERNAL_TARGETS = {"governance-dotnet"}
ACL_FILE = ROOT / "deploy/redis/users.acl"
DEV_PASSWORDS = {
    "producer": "hvobs-dev-producer",
    "reader": "hvobs-dev-reader",
    "worker": "hvobs-dev-worker",
    "admin": "hvobs-dev-admin",
}
"""The development passwords the shipped ACL file holds (docs/operations.md names them)."""
STREAM = "hvobs:events"
GROUPS = ["ring", "spans"]


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with every variable unset: the default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def _python_services(compose: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        if "build" in service:
            command = service["command"]
            out[name] = shlex.split(command) if isinstance(command, str) else list(command)
    return out


def test_stack_has_the_services_the_issue_names(compose: dict[str, Any]) -> None:
    """Redis, simulators, two ring-metrics workers, a saga-span worker, Prometheus, Grafana and
    the span pipeline are all defined; Redis runs with AOF and noeviction."""
    services = compose["services"]
    ring_workers = [n for n, argv in _python_services(compose).items() if "ring-metrics" in argv]
    span_workers = [n for n, argv in _python_services(compose).items() if "saga-spans" in argv]
    assert len(ring_workers) == 2
    assert len(span_workers) == 1
    assert {"redis", "prometheus", "grafana", "otel-collector", "jaeger"} <= set(services)
    redis_argv = services["redis"]["command"]
    assert redis_argv[redis_argv.index("--appendonly") + 1] == "yes"
    assert redis_argv[redis_argv.index("--maxmemory-policy") + 1] == "noeviction"


def test_every_python_command_parses_with_the_real_cli(compose: dict[str, Any]) -> None:
    """Each simulator and worker command line is accepted by the parser of the program it runs,
    so a renamed or removed option cannot leave the stack broken unnoticed."""
    commands = _python_services(compose)
    assert commands
    for name, argv in commands.items():
        if argv[0] == "hvobs":
            args = build_parser().parse_args(argv[1:])
            assert callable(args.handler), name
        else:
            assert argv[:3] == ["python", "-m", "hypervisor.observability.demo.simulate"], name
            simulator_parser().parse_args(argv[3:])


def test_mounted_configuration_exists(compose: dict[str, Any]) -> None:
    """Every bind mount of the stack points at a file or folder of this repository, and the
    image's Dockerfile exists."""
    mounts = 0
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = interpolate(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
                mounts += 1
    assert mounts >= 5
    build = compose["x-python"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_prometheus_scrapes_services_of_the_stack(compose: dict[str, Any]) -> None:
    """Every scrape target is a service of the compose file on a port its program listens on
    (the external .NET governance service aside)."""
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    commands = _python_services(compose)
    services = compose["services"]
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if host in EXTERNAL_TARGETS:
                    continue
                assert host in services, target
                if host in commands:
                    argv = commands[host]
                    flag = "--metrics-port" if argv[0] == "hvobs" else "--port"
                    assert argv[argv.index(flag) + 1] == port, target


def test_redis_loads_the_shipped_acl_file(compose: dict[str, Any]) -> None:
    """Redis starts with ``--aclfile`` pointing at the mounted ``deploy/redis/users.acl`` (or the
    file named by HVOBS_REDIS_ACL_FILE)."""
    redis = compose["services"]["redis"]
    argv = redis["command"]
    target = argv[argv.index("--aclfile") + 1]
    mounts = {
        interpolate(v).split(":")[1]: (v, interpolate(v).split(":")[0]) for v in redis["volumes"]
    }
    raw, source = mounts[target]
    assert source == "./deploy/redis/users.acl"
    assert raw.startswith("${HVOBS_REDIS_ACL_FILE:-")
    assert raw.endswith(":ro")


def test_users_acl_is_the_generator_output() -> None:
    """deploy/redis/users.acl is exactly what scripts/make_redis_users.sh (``hvobs acl`` for each
    role) prints for the compose stream, groups and development passwords."""
    env = {f"HVOBS_{role.upper()}_PASSWORD": pw for role, pw in DEV_PASSWORDS.items()}
    bin_dir = str(Path(sys.executable).parent)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/make_redis_users.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ["PATH"]},
        check=True,
    )
    assert done.stdout == ACL_FILE.read_text()
    lines = ACL_FILE.read_text().splitlines()
    assert lines[0] == "user default reset on nopass resetchannels -@all +ping"
    for role, password in DEV_PASSWORDS.items():
        groups = GROUPS if role in ("worker", "admin") else []
        assert acl_line(role, STREAM, role, password, groups=groups, form="aclfile") in lines
    assert not any(password in done.stdout for password in DEV_PASSWORDS.values())


def test_services_connect_as_their_role(compose: dict[str, Any]) -> None:
    """Simulators connect as the producer, workers as the worker, each through HVOBS_REDIS_URL
    (no password on a command line); the URL's default password is the one the ACL file holds
    for that user, whose line is ``hvobs acl``'s for the service's stream, and a worker's group
    is one the worker user may keep state for."""
    users = {line.split()[1]: line for line in ACL_FILE.read_text().splitlines()}
    commands = _python_services(compose)
    assert commands
    for name, argv in commands.items():
        assert "--redis" not in argv, name
        url = urlsplit(interpolate(compose["services"][name]["environment"]["HVOBS_REDIS_URL"]))
        assert url.hostname == "redis", name
        user, password = unquote(url.username or ""), unquote(url.password or "")
        role = "worker" if argv[0] == "hvobs" else "producer"
        assert user == role, name
        stream = argv[argv.index("--stream") + 1] if "--stream" in argv else STREAM
        groups = GROUPS if role == "worker" else []
        assert users[user] == acl_line(role, stream, user, password, groups=groups, form="aclfile")
        if role == "worker":
            assert argv[argv.index("--group") + 1] in GROUPS, name


def test_exemplars_and_the_spawn_tree_reach_the_backends(compose: dict[str, Any]) -> None:
    """Prometheus stores exemplars (the ring counters' trace ids), Grafana links them to
    Jaeger, and the span worker exports the agents' spawn tree next to the saga spans, as
    scripts/run_stack.sh does too."""
    assert "--enable-feature=exemplar-storage" in compose["services"]["prometheus"]["command"]
    span_workers = [argv for argv in _python_services(compose).values() if "saga-spans" in argv]
    assert all("--agent-spans" in argv for argv in span_workers)
    sources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text()
    )["datasources"]
    prometheus = next(s for s in sources if s["type"] == "prometheus")
    jaeger = next(s for s in sources if s["type"] == "jaeger")
    assert prometheus["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": jaeger["uid"]}
    ]
    script = (ROOT / "scripts/run_stack.sh").read_text()
    assert "--enable-feature=exemplar-storage" in script
    assert "--agent-spans" in script
