"""docker-compose.yml, checked without Docker: every program it runs accepts its arguments, every
file it mounts exists, and Prometheus scrapes services the file defines."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from hypervisor.observability.cli import build_parser
from hypervisor.observability.demo.simulate import build_parser as simulator_parser

ROOT = Path(__file__).resolve().parent.parent
# The tutorial's .NET governance service is the user's own; the stack only scrapes it.
EXTERNAL_TARGETS = {"governance-dotnet"}


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
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
                mounts += 1
    assert mounts >= 4
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
