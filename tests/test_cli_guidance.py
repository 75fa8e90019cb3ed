"""The ``hvobs`` commands guide their operator (issue 14, item 4).

Each operator mistake is run as a real subprocess: it ends with exactly one line on stderr, a
non-zero exit status and no traceback, and the line says what is wrong (the host and port of a
Redis that does not answer, the port in use and the option that picks another) without ever
showing the password of a URL. The option declarations are checked on the real parser: every
option shows its default (and its unit), numbers are range-checked, and every command that
talks to a bus takes ``--stream`` with one default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.observability._util.cli import DEFAULT_STREAM, REDIS_URL_ENV
from hypervisor.observability.cli import build_parser, main
from redis_server import RedisServer, free_port

HVOBS = [sys.executable, "-m", "hypervisor.observability.cli"]
SECRET = "hunter2secret"
ROOT = Path(__file__).resolve().parent.parent


def run_hvobs(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``hvobs`` to completion without the operator's environment variables."""
    clean = {k: v for k, v in os.environ.items() if k not in (REDIS_URL_ENV, "HVOBS_TOKEN")}
    return subprocess.run(
        [*HVOBS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """Assert the run failed with ``status`` and exactly one stderr line; return that line."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert SECRET not in result.stderr + result.stdout
    return lines[0]


# -- mistakes, as subprocesses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["worker", "ring-metrics", "--redis", f"ops:{SECRET}@localhost:6379", "--group", "g"],
        ["worker", "saga-spans", "--redis", "localhost:6379", "--group", "g"],
        ["dlq", "replay", "--redis", f"ops:{SECRET}@10.0.0.5:6379/0"],
        ["demo", "--redis", "localhost:6379"],
        ["serve", "--redis", f"ops:{SECRET}@localhost:6379"],
    ],
)
def test_redis_url_without_a_scheme(args: list[str]) -> None:
    """A Redis URL without a scheme: one line showing what a URL looks like (and the URL
    without its credentials), exit status 2."""
    line = one_line(run_hvobs(*args), 2)
    assert "redis://localhost:6379/0" in line
    assert "--help" in line


def test_redis_url_from_the_environment_is_checked_too() -> None:
    """``$HVOBS_REDIS_URL`` without a scheme is refused the same way, naming the variable."""
    line = one_line(run_hvobs("dlq", "list", env={REDIS_URL_ENV: f"u:{SECRET}@host:6379"}), 2)
    assert REDIS_URL_ENV in line
    assert "***@host:6379" in line


def test_no_redis_url_at_all() -> None:
    """Neither ``--redis`` nor ``$HVOBS_REDIS_URL``: one line naming both, status 2."""
    line = one_line(run_hvobs("worker", "ring-metrics", "--group", "g"), 2)
    assert "--redis" in line
    assert REDIS_URL_ENV in line


@pytest.mark.parametrize(
    "args",
    [
        ["worker", "ring-metrics", "--group", "g", "--metrics-port", "0"],
        ["worker", "saga-spans", "--group", "g", "--metrics-port", "0"],
        ["dlq", "list"],
        ["dlq", "replay", "--dry-run"],
        ["demo", "--agents", "1", "--sagas", "0"],
    ],
)
def test_redis_down_names_host_and_port(args: list[str]) -> None:
    """Redis not running: one line naming its host and port (never the password) and what to
    do, status 1, after ``--connect-timeout``."""
    port = free_port()
    url = f"redis://ops:{SECRET}@127.0.0.1:{port}/0"
    line = one_line(run_hvobs(*args, "--redis", url, "--connect-timeout", "0.3"), 1)
    assert f"cannot reach Redis at 127.0.0.1:{port}" in line
    assert "Connection refused" in line
    assert "redis-server" in line


def test_metrics_port_in_use_names_it_and_the_way_out() -> None:
    """A metrics port already taken: one line naming the port and how to pick another,
    status 1, before anything else (no Redis needed to find out)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_hvobs(
            "worker", "saga-spans", "--redis", "redis://127.0.0.1:1/0", "--group", "g",
            "--metrics-port", str(port),
        )  # fmt: skip
    line = one_line(result, 1)
    assert f"port {port} on 127.0.0.1 is already in use" in line
    assert "--metrics-port 0" in line


def test_unknown_log_level() -> None:
    """An unknown log level: one line naming it and the levels there are, status 2."""
    line = one_line(
        run_hvobs("worker", "ring-metrics", "--group", "g", "--log-level", "verbose"), 2
    )
    assert "'verbose'" in line
    assert "debug, info, warning, error" in line


# -- option values, on the real parser ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["worker", "ring-metrics", "--group", "g", "--batch-size", "0"], "at least 1"),
        (["worker", "ring-metrics", "--group", "g", "--batch-size", "ten"], "whole number"),
        (["worker", "ring-metrics", "--group", "g", "--block", "-1"], "positive number of sec"),
        (["worker", "saga-spans", "--group", "g", "--claim-interval", "0"], "positive number"),
        (["worker", "saga-spans", "--group", "g", "--claim-min-idle", "nan"], "positive number"),
        (["worker", "saga-spans", "--group", "g", "--max-pending-age", "inf"], "positive"),
        (["worker", "ring-metrics", "--group", "g", "--apply-interval", "-0.5"], "positive"),
        (["worker", "ring-metrics", "--group", "g", "--max-deliveries", "0"], "at least 1"),
        (["worker", "ring-metrics", "--group", "g", "--max-event-bytes", "-1"], "at least 1"),
        (["worker", "ring-metrics", "--group", "g", "--max-agents", "0"], "at least 1"),
        (["worker", "ring-metrics", "--group", "g", "--metrics-port", "70000"], "65535"),
        (["worker", "ring-metrics", "--group", "g", "--connect-timeout", "-2"], "positive"),
        (["worker", "ring-metrics"], "--group"),
        (["dlq", "list", "--limit", "0"], "at least 1"),
        (["dlq", "replay", "--limit", "-3"], "at least 1"),
        (["dlq", "replay", "--reason", "bored"], "invalid choice"),
        (["demo", "--agents", "0"], "at least 1"),
        (["demo", "--sagas", "-1"], "at least 0"),
        (["acl", "--role", "reader", "--user", "u", "--password-env", "P", "--stream", ""], "1 to"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_values_are_one_line_usage_errors(
    args: list[str], mentions: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out-of-range numbers, negative or non-finite durations, unknown choices and missing
    options end the command with status 2 and one stderr line saying which rule was broken."""
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert mentions in err


def leaf_parsers(
    parser: argparse.ArgumentParser, name: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every runnable (sub)command parser, with its command words."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield name, parser
        return
    for action in subcommands:
        for word, sub in action.choices.items():
            yield from leaf_parsers(sub, f"{name} {word}".strip())


def _in_required_group(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    return any(
        group.required and action in group._group_actions
        for group in parser._mutually_exclusive_groups
    )


def test_help_shows_every_option_with_its_default_and_unit() -> None:
    """Every option of every command has help text that states its default (or says it is
    required), durations say seconds and sizes bytes, and the help renders."""
    commands = dict(leaf_parsers(build_parser()))
    assert set(commands) == {
        "demo", "worker ring-metrics", "worker saga-spans", "dlq list", "dlq replay", "acl",
        "serve", "doctor",
    }  # fmt: skip
    for name, parser in commands.items():
        rendered = " ".join(parser.format_help().split())
        assert "%(" not in rendered, name
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            option = action.option_strings[-1]
            assert option in rendered, (name, option)
            text = action.help or ""
            assert text, (name, option)
            if action.required or _in_required_group(parser, action):
                continue
            assert "default" in text, (name, option, text)
            if action.metavar == "SECONDS":
                assert "seconds" in text, (name, option)
            if action.metavar == "BYTES":
                assert "bytes" in text, (name, option)


def test_every_command_on_a_bus_takes_the_same_stream() -> None:
    """Every command that reads or writes a bus takes ``--stream`` with the one default,
    ``hvobs:events`` (the doctor checks the installation, not a bus)."""
    for name, parser in leaf_parsers(build_parser()):
        streams = [a for a in parser._actions if "--stream" in a.option_strings]
        if name == "doctor":
            assert not streams
            continue
        assert len(streams) == 1, name
        assert streams[0].default == DEFAULT_STREAM == "hvobs:events", name


def test_each_worker_serves_metrics_on_its_own_default_port() -> None:
    """The ring-metrics worker's /metrics defaults to 9101, the saga-spans worker's to 9102,
    so both run side by side on one host as written."""
    parser = build_parser()
    ring = parser.parse_args(["worker", "ring-metrics", "--group", "r"])
    spans = parser.parse_args(["worker", "saga-spans", "--group", "s"])
    assert (ring.metrics_port, spans.metrics_port) == (9101, 9102)


def test_readme_bus_example_and_commands_share_one_stream() -> None:
    """The README's bus example and its hvobs commands name no stream other than the
    default, so running them as written makes them work together."""
    readme = (ROOT / "README.md").read_text()
    named = re.findall(r'stream="([^"]+)"', readme) + re.findall(r"--stream ([\w:.-]+)", readme)
    assert named, "the README shows the stream"
    assert set(named) <= {DEFAULT_STREAM, "NAME"}, named
    assert "hvobs worker saga-spans" in readme
    assert "--metrics-port 9102" in readme or "9102" in readme


# -- workers on a real Redis -------------------------------------------------------------------


@pytest.mark.redis
def test_saga_worker_without_a_sink_warns_and_serves_metrics_and_health(
    redis_server: RedisServer, stream_name: str
) -> None:
    """A saga-spans worker with no sink says so in one warning line at start, and serves
    ``/metrics`` and ``/healthz`` like the ring-metrics worker; SIGTERM stops it with 0."""
    argv = [
        *HVOBS, "worker", "saga-spans", "--redis", redis_server.url, "--stream", stream_name,
        "--group", "spans", "--metrics-port", "0", "--log-level", "warning",
    ]  # fmt: skip
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stderr is not None
            line = process.stdout.readline()
            assert line.startswith("metrics-port="), line
            port = int(line.split("=", 1)[1])
            base = f"http://127.0.0.1:{port}"
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
                assert answer.status == 200
                assert b"hvobs_worker_events_total" in answer.read()
            with urllib.request.urlopen(f"{base}/healthz", timeout=10) as answer:
                assert answer.status == 200
                assert json.loads(answer.read())["connected"] is True
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
            err = process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    warnings = [text for text in err.splitlines() if "no span sink" in text]
    assert len(warnings) == 1, err
    assert "--jsonl" in warnings[0]
    assert "--otlp-endpoint" in warnings[0]
    assert "Traceback" not in err
