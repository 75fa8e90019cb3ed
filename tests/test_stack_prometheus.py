"""The deployable stack against a real Prometheus (Debian's package, started on loopback).

The test takes ``deploy/prometheus/prometheus.yml`` and ``rules.yml`` as shipped, rewrites only
the targets (the live processes started here: a fleet simulator writing to a Redis stream, two
``hvobs worker ring-metrics`` processes consuming it) and the intervals (1 s), has ``promtool``
check them, runs Prometheus, and then requires that every PromQL expression of the Grafana
dashboard and of the alert and recording rules returns data, that ``HighRingBreachRate`` goes
pending for the breaching agent and for no other, and that Prometheus (with exemplar storage, as
shipped) stores the breach counter's exemplars, which name the rogue agent's span.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES_YML = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "agent-observability.json"
ROGUE = "did:mesh:rogue-bot"

T = TypeVar("T")

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def _binaries() -> tuple[str, str]:
    prometheus = shutil.which("prometheus")
    promtool = shutil.which("promtool")
    if prometheus and promtool:
        return prometheus, promtool
    reason = "prometheus/promtool not installed (scripts/test.sh installs Debian's prometheus)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns a value (not None), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (OSError, ValueError, KeyError) as exc:  # not up yet, or not ready
            last_error = exc
            value = None
        if value is not None:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})")


def _answers(url: str) -> Callable[[], bool | None]:
    def probe() -> bool | None:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200 or None

    return probe


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel.get("datasource") or {}
            if source.get("type") == "prometheus":
                exprs.append((f"panel {panel['title']!r}", target["expr"]))
    return exprs


def _rule_exprs() -> list[tuple[str, str]]:
    """The recording rules and the fleet's alert rules. The pipeline's alerts (group
    ``hvobs-pipeline``) compare recording rules, checked here, with thresholds that a healthy
    stack does not cross; ``deploy/prometheus/rules.test.yml`` shows each of them fire."""
    rules = yaml.safe_load(RULES_YML.read_text())
    return [
        (f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
        if "record" in rule or group["name"] != "hvobs-pipeline"
    ]


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class _Fleet:
    """Ports of the live processes Prometheus scrapes."""

    simulator: int
    otel_view: int
    workers: list[int]
    spans: int


@pytest.fixture(scope="module")
def fleet(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Fleet]:
    """The demo workload on a Redis stream, and two ring-metrics workers consuming it.

    The simulator appends its fleet's events to a fresh stream and serves its governance metrics
    twice: with prometheus_client, and through an OpenTelemetry meter and OpenTelemetry's
    Prometheus exporter (standing in for a .NET kernel). Two ``hvobs worker ring-metrics``
    processes share consumer group ``ring`` and each serve the global ring metrics; one
    ``hvobs worker saga-spans`` (group ``spans``) serves its own health.
    """
    pytest.importorskip("opentelemetry.exporter.prometheus")
    logs = tmp_path_factory.mktemp("fleet")
    stream = f"stack:{uuid.uuid4().hex[:10]}"
    processes: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def spawn(name: str, args: list[str]) -> None:
        log = (logs / f"{name}.log").open("wb")
        processes.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), log))

    ports = _Fleet(_free_port(), _free_port(), [_free_port(), _free_port()], _free_port())
    spawn(
        "simulator",
        [
            sys.executable,
            "-m",
            "hypervisor.observability.demo.simulate",
            "--port",
            str(ports.simulator),
            "--otel-metrics-port",
            str(ports.otel_view),
            "--redis",
            redis_server.url,
            "--stream",
            stream,
            "--tick",
            "0.05",
            # rate(x[5m]) divides by the whole 5 minutes even when the series is seconds old, so
            # the rogue agent breaches faster than in the demo to cross the rule's 0.5/s quickly.
            "--breach-rate",
            "40",
            "--duration",
            "600",
        ],
    )
    for index, port in enumerate(ports.workers, start=1):
        spawn(
            f"ring-metrics-{index}",
            [
                sys.executable,
                "-c",
                "import sys; from hypervisor.observability.cli import main; sys.exit(main())",
                "worker",
                "ring-metrics",
                "--redis",
                redis_server.url,
                "--stream",
                stream,
                "--group",
                "ring",
                "--consumer",
                f"ring-{index}",
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                str(port),
            ],
        )
    spawn(
        "saga-spans",
        [
            sys.executable,
            "-c",
            "import sys; from hypervisor.observability.cli import main; sys.exit(main())",
            "worker",
            "saga-spans",
            "--redis",
            redis_server.url,
            "--stream",
            stream,
            "--group",
            "spans",
            "--consumer",
            "spans-1",
            "--jsonl",
            str(logs / "spans.jsonl"),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(ports.spans),
        ],
    )
    try:
        for port in (ports.simulator, ports.otel_view, *ports.workers, ports.spans):
            _wait_for(
                f"port {port} to serve /metrics (logs in {logs})",
                _answers(f"http://127.0.0.1:{port}/metrics"),
                timeout=30,
                interval=0.2,
            )
        yield ports
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.terminate()
        for process, log in processes:
            _terminate(process)
            log.close()


@pytest.fixture(scope="module")
def prometheus(fleet: _Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus with the shipped config and rules, scraping the live fleet every second."""
    prometheus_bin, promtool = _binaries()
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # Only targets change; everything else (relabelling included) is kept as shipped. The
    # OpenTelemetry view stands in for the .NET kernel; the collector job has no process here.
    targets = {
        "agent-hypervisor": [f"127.0.0.1:{port}" for port in fleet.workers],
        "agent-simulator": [f"127.0.0.1:{fleet.simulator}"],
        "agent-governance": [f"127.0.0.1:{fleet.otel_view}"],
        "hvobs-span-workers": [f"127.0.0.1:{fleet.spans}"],
    }
    for name, addresses in targets.items():
        jobs[name]["static_configs"] = [{"targets": addresses}]
    config["scrape_configs"] = [jobs[name] for name in targets]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy(RULES_YML, workdir / "rules.yml")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"]):
        checked = subprocess.run(
            [promtool, *args], cwd=workdir, capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    port = _free_port()
    process = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            # As docker-compose.yml and scripts/run_stack.sh run it.
            "--enable-feature=exemplar-storage",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(
            "Prometheus to be ready",
            lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200 or None,
            timeout=60,
        )
        yield url
    finally:
        _terminate(process)


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    body = _get_json(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_shipped_configuration_passes_promtool() -> None:
    """promtool accepts deploy/prometheus/prometheus.yml and its rules exactly as shipped."""
    _, promtool = _binaries()
    checked = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    every_rule = sum(
        len(group["rules"]) for group in yaml.safe_load(RULES_YML.read_text())["groups"]
    )
    assert f"{every_rule} rules found" in checked.stdout + checked.stderr


def test_dashboard_has_the_tutorial_panels() -> None:
    """The provisioned dashboard has every panel of the tutorial's layout."""
    titles = {panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]}
    assert {
        "Ring Transitions",
        "Breach Rate",
        "Current Ring Levels",
        "Elevation Duration",
        "Policy Decisions",
        "Trust Scores",
        "Saga Span Timeline",
    } <= titles
    # The quantile is computed over the bucket series, never over the bare histogram name.
    for _, expr in _dashboard_exprs() + _rule_exprs():
        if "histogram_quantile" in expr:
            assert "_bucket" in expr


def test_scraped_targets_are_up(prometheus: str) -> None:
    """Prometheus scrapes the live workload: every target reports up."""

    def all_up() -> list[dict[str, Any]] | None:
        targets = _get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        return targets if targets and all(t["health"] == "up" for t in targets) else None

    targets = _wait_for("the scrape targets to be up", all_up, timeout=30)
    assert {t["labels"]["job"] for t in targets} == {
        "agent-hypervisor",
        "agent-simulator",
        "agent-governance",
        "hvobs-span-workers",
    }
    assert len(targets) == 5
    # Both workers serve the global ring metrics.
    per_worker = _wait_for(
        "both workers to serve breaches",
        lambda: (
            result
            if len(
                result := _query(
                    prometheus, "count by (instance) (agent_hypervisor_ring_breaches_total)"
                )
            )
            == 2
            else None
        ),
        timeout=30,
    )
    assert len(per_worker) == 2
    # The pipeline's per-group health covers the span workers' group too.
    groups = _wait_for(
        "both groups to report a connected worker",
        lambda: (
            result
            if len(result := _query(prometheus, "group:hvobs_worker_connected:max >= 1")) == 2
            else None
        ),
        timeout=30,
    )
    assert {sample["metric"]["group"] for sample in groups} == {"ring", "spans"}


def test_every_dashboard_and_rule_expression_returns_data(prometheus: str) -> None:
    """Each PromQL expression of the dashboard and the alert rules has a non-empty result."""
    expressions = _dashboard_exprs() + _rule_exprs()
    assert len(expressions) >= 12
    pending = dict.fromkeys(expressions)
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for item in list(pending):
            if _query(prometheus, item[1]):
                del pending[item]
        if pending:
            time.sleep(1)
    assert not pending, f"expressions without data: {list(pending)}"


def test_breach_alert_goes_pending_for_the_breaching_agent(prometheus: str) -> None:
    """HighRingBreachRate becomes pending (or firing) for the rogue agent, and only for it."""

    def breach_alerts() -> list[dict[str, Any]] | None:
        alerts = _get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
        found = [a for a in alerts if a["labels"]["alertname"] == "HighRingBreachRate"]
        return found or None

    alerts = _wait_for("HighRingBreachRate to go pending", breach_alerts, timeout=60)
    assert {alert["labels"]["agent_did"] for alert in alerts} == {ROGUE}
    assert all(alert["state"] in {"pending", "firing"} for alert in alerts)
    assert float(alerts[0]["value"]) > 0.5


def test_breach_exemplars_are_stored_and_name_the_rogue_agents_span(prometheus: str) -> None:
    """Prometheus scrapes the workers in OpenMetrics and stores the breach counter's exemplars:
    each names the trace and span of the rogue agent's span in the simulator's spawn tree."""
    now = time.time()

    def exemplars() -> list[dict[str, Any]] | None:
        query = {
            "query": "agent_hypervisor_ring_breaches_total",
            "start": now - 3600,
            "end": time.time() + 60,
        }
        found = _get_json(f"{prometheus}/api/v1/query_exemplars?{urllib.parse.urlencode(query)}")
        series = found["data"]
        return series or None

    series = _wait_for("breach exemplars", exemplars, timeout=60)
    assert {item["seriesLabels"]["agent_did"] for item in series} == {ROGUE}
    stored = [exemplar for item in series for exemplar in item["exemplars"]]
    assert stored
    for exemplar in stored:
        assert len(exemplar["labels"]["trace_id"]) == 32
        assert len(exemplar["labels"]["span_id"]) == 16
        # Event time: the simulator's breaches happened during this test session.
        assert now - 3600 < float(exemplar["timestamp"]) < time.time() + 60


def test_both_languages_land_on_one_latency_series(prometheus: str, fleet: _Fleet) -> None:
    """The OpenTelemetry exporter's _milliseconds histogram is relabelled to the Python name."""
    exporter_name = "agent_governance_evaluation_latency_ms_milliseconds_bucket"
    # The OpenTelemetry view really does publish the unit-suffixed name (so relabelling matters).
    url = f"http://127.0.0.1:{fleet.otel_view}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert exporter_name in response.read().decode()
    _wait_for(
        "the OpenTelemetry view to be scraped",
        lambda: (
            _query(prometheus, 'agent_governance_policy_decisions_total{job="agent-governance"}')
            or None
        ),
        timeout=30,
    )
    assert not _query(prometheus, f'{{__name__="{exporter_name}"}}')
    for job in ("agent-governance", "agent-simulator"):
        series = _query(prometheus, f'agent_governance_evaluation_latency_ms_bucket{{job="{job}"}}')
        assert series, job
    both = _query(
        prometheus,
        "count by (job) (agent_governance_evaluation_latency_ms_count)",
    )
    assert {item["metric"]["job"] for item in both} == {"agent-governance", "agent-simulator"}


@pytest.mark.redis
def test_simulator_feeds_the_shared_stream_in_redis_mode(
    redis_server: Any, stream_name: str
) -> None:
    """With --redis the simulator appends its fleet's events to the stream the workers read."""
    import redis

    from hypervisor.observability.codec import decode_event

    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "hypervisor.observability.demo.simulate",
            "--port",
            "0",
            "--redis",
            redis_server.url,
            "--stream",
            stream_name,
            "--fleet",
            "east",
            "--duration",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    client = redis.Redis.from_url(redis_server.url)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream_name)  # type: ignore[assignment]
    finally:
        client.close()
    assert entries
    events = [decode_event(fields[b"e"]) for _, fields in entries]
    kinds = {event.event_type.value for event in events}
    assert {"ring.assigned", "ring.breach_detected"} <= kinds
    assert {
        event.agent_did for event in events if event.event_type.value == "ring.breach_detected"
    } == {"did:mesh:east.rogue-bot"}
