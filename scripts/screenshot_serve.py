"""Take the README's screenshot of ``hvobs serve --demo`` with Debian's headless Chromium.

Starts ``hvobs serve --demo --port 0`` as a subprocess, lets the live fleet run for a few
seconds, loads the page in ``/usr/bin/chromium`` (through ``/usr/bin/chromedriver``; nothing
is downloaded) and saves a PNG.

    .venv/bin/python scripts/screenshot_serve.py [--out docs/serve.png] [--wait 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    """Start the demo server, screenshot the page, stop the server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "serve.png")
    parser.add_argument("--wait", type=float, default=8.0, help="seconds of live demo first")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000, help="first window height")
    args = parser.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-m", "hypervisor.observability.cli", "serve", "--demo", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        time.sleep(args.wait)
        with tempfile.TemporaryDirectory(prefix="hvobs-chromium-") as profile:
            options = Options()
            options.binary_location = "/usr/bin/chromium"
            for flag in (
                "--headless",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--window-size={args.width},{args.height}",
                f"--user-data-dir={profile}",
            ):
                options.add_argument(flag)
            if os.geteuid() == 0:
                options.add_argument("--no-sandbox")
            driver = webdriver.Chrome(
                service=Service(executable_path="/usr/bin/chromedriver"), options=options
            )
            try:
                driver.get(url)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    state = driver.find_element(By.ID, "connection").get_attribute("data-state")
                    if state == "live" and driver.find_elements(By.CSS_SELECTOR, ".saga"):
                        break
                    time.sleep(0.2)
                time.sleep(1.5)  # one refresh of the derived views
                # The whole page, not only the first screen.
                height = driver.execute_script("return document.documentElement.scrollHeight;")
                driver.set_window_size(args.width, int(height) + 40)
                time.sleep(0.5)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
    finally:
        server.terminate()
        server.wait(10)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
