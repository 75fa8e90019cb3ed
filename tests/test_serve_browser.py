"""The page of ``hvobs serve`` in a real browser: Debian's headless Chromium driven by Selenium.

Nothing downloads a browser: Selenium is given ``/usr/bin/chromedriver`` and
``/usr/bin/chromium`` (``scripts/bootstrap.sh`` installs both from Debian's packages). The
page is served by a real uvicorn over the live demo fleet.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.observability._bus.bus import RedisEventBus
from hypervisor.observability._core.events import EventType, HypervisorEvent
from hypervisor.observability.demo import generate_fleet
from hypervisor.observability.demo.live import LiveFleet, drive
from hypervisor.observability.web.runtime import ServeRuntime
from serve_support import ServerThread, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLEET = generate_fleet(seed=11, agents=6, sagas=4)

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """A headless Chromium (fresh profile) under Selenium."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/test.sh installs it)")
        pytest.skip("chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root otherwise
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def demo_runtime() -> ServeRuntime:
    """The demo fleet, emitting a new activity every few seconds."""
    bus = RedisEventBus.in_memory(max_len=10_000, max_events=10_000)
    live = LiveFleet(FLEET, seed=1, pace_s=3.0)
    return ServeRuntime(bus, source="demo fleet", driver=lambda b: drive(b, live, tick_s=0.1))


def test_page_renders_the_fleet_and_follows_the_stream_across_a_reconnect(
    browser: object,
) -> None:
    """The timeline shows the demo's sagas (the failed step marked, the compensations as
    bars) and the spawn tree its agents with their rings; a newly emitted event appears
    without a reload; after the server ends the stream the page reconnects and shows the
    next event once, without repeating the earlier one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    assert isinstance(browser, WebDriver)
    driver = browser

    def css(selector: str) -> list[object]:
        return list(driver.find_elements(By.CSS_SELECTOR, selector))

    def text(selector: str) -> str:
        return "\n".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, selector))

    saga_ids = sorted(
        e.payload["saga_id"] for e in FLEET.events if e.event_type is EventType.SAGA_CREATED
    )
    with ServerThread(demo_runtime) as server:
        driver.get(server.url + "/")
        wait_until(
            lambda: all(css(f'#timeline article[data-saga-id="{s}"]') for s in saga_ids),
            timeout=20,
            what="the demo's sagas in the timeline",
        )
        wait_until(
            lambda: all(css(f'#trees li[data-agent="{a.did}"]') for a in FLEET.agents),
            timeout=10,
            what="the demo's agents in the spawn tree",
        )
        tree = text("#trees")
        for agent in FLEET.agents:
            assert agent.did in tree
        assert len(css("#trees .tree-node .ring")) >= len(FLEET.agents)
        assert all("ring " in e.text for e in driver.find_elements(By.CSS_SELECTOR, ".ring"))
        rolled_back = f'#timeline article[data-saga-id="{saga_ids[1]}"]'
        assert css(f"{rolled_back} .bar.failed")
        assert "✕ failed" in text(rolled_back)
        assert css(f'{rolled_back} .bar[data-kind="compensation"]')
        assert "rolled back" in text(f"{rolled_back} .saga-state")
        assert "ring.assigned" in text("#feed .etype")

        driver.execute_script("window.__noReload = 42;")
        probe = HypervisorEvent(
            event_type=EventType.RING_BREACH_DETECTED,
            agent_did="did:mesh:browser-probe",
            session_id="session-probe",
            causal_trace_id=FLEET.agents[1].trace.child().full_id,
            payload={"attempted_tool": "shell_exec"},
        )
        server.emit([probe])
        row = f'#feed li[data-event-id="{probe.event_id}"]'
        wait_until(lambda: css(row), timeout=10, what="the new event in the feed")
        assert "ring.breach_detected" in text(row)
        wait_until(
            lambda: css('#breaches li[data-agent="did:mesh:browser-probe"]'),
            timeout=10,
            what="the probe's breach in Current breaches",
        )
        wait_until(
            lambda: css('#trees li[data-agent="did:mesh:browser-probe"]'),
            timeout=10,
            what="the probe in the spawn tree",
        )
        assert driver.execute_script("return window.__noReload;") == 42

        before = driver.execute_script("return window.hvobs.reconnects;")
        server.run(lambda: server.runtime.broadcaster.close_all())  # type: ignore[union-attr]
        wait_until(
            lambda: (
                driver.execute_script("return window.hvobs.reconnects;") > before
                and driver.find_element(By.ID, "connection").get_attribute("data-state") == "live"
            ),
            timeout=15,
            what="the page to reconnect",
        )
        after = HypervisorEvent(
            event_type=EventType.VFS_WRITE, agent_did="did:mesh:browser-probe", payload={"n": 2}
        )
        server.emit([after])
        wait_until(
            lambda: css(f'#feed li[data-event-id="{after.event_id}"]'),
            timeout=10,
            what="the event after the reconnect",
        )
        assert len(css(row)) == 1
        assert len(css(f'#feed li[data-event-id="{after.event_id}"]')) == 1
        assert driver.execute_script("return window.__noReload;") == 42
