#!/usr/bin/env bash
# The test command: installs everything the suite needs on a fresh machine, then runs ruff
# (lint and format check), mypy --strict and pytest. Exits non-zero on any failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/bootstrap.sh
source "$here/bootstrap.sh"

ensure_redis_server
ensure_openssl
ensure_prometheus
ensure_chromium
ensure_venv
cd "$root"
echo "== ruff check" && "$venv/bin/ruff" check .
echo "== ruff format --check" && "$venv/bin/ruff" format --check .
echo "== mypy --strict" && "$venv/bin/mypy"
echo "== pytest" && "$venv/bin/python" -m pytest "$@"
