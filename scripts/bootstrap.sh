#!/usr/bin/env bash
# Shared set-up for the quick-start commands: a project virtual environment with the package
# installed (editable, with the OpenTelemetry and development extras) and, when asked, the
# redis-server binary the Redis tests start on free ports and Debian's headless Chromium with
# its driver for the page's browser test.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HVOBS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

ensure_venv() {
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$root[otel,dev]"
}

apt_install() {
    # Debian's packages; root on these machines, sudo elsewhere when available.
    local sudo=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

ensure_redis_server() {
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "bootstrap: installing redis-server from Debian's packages" >&2
        apt_install redis-server
    fi
}

ensure_openssl() {
    # The openssl command makes the throwaway CA and certificates of the TLS tests.
    if ! command -v openssl >/dev/null 2>&1; then
        echo "bootstrap: installing openssl from Debian's packages" >&2
        apt_install --no-install-recommends openssl
    fi
}

ensure_prometheus() {
    # Debian's prometheus package (prometheus + promtool) for tests/test_stack_prometheus.py.
    if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
        echo "bootstrap: installing prometheus from Debian's packages" >&2
        apt_install --no-install-recommends prometheus
    fi
}

ensure_chromium() {
    # Debian's chromium and chromium-driver for tests/test_serve_browser.py (Selenium drives
    # /usr/bin/chromium through /usr/bin/chromedriver; nothing downloads a browser), and a font
    # so that the page's text renders in screenshots.
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
        echo "bootstrap: installing chromium and chromium-driver from Debian's packages" >&2
        apt_install --no-install-recommends chromium chromium-driver fonts-dejavu-core
    fi
}
