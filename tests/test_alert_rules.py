"""The shipped alert rules, unit-tested with ``promtool test rules`` (deploy/prometheus)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/test.sh installs Debian's prometheus)")
    return promtool


def test_every_alert_fires_and_stays_quiet_in_the_unit_tests() -> None:
    """promtool passes rules.test.yml, which has a firing and a quiet case for every alert."""
    result = subprocess.run(
        [_promtool(), "test", "rules", "rules.test.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules.test.yml").read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert alerts <= firing, f"alerts never shown to fire: {sorted(alerts - firing)}"
    assert alerts <= quiet, f"alerts never shown quiet: {sorted(alerts - quiet)}"
