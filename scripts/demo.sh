#!/usr/bin/env bash
# The main job: installs the package into the project virtual environment and runs `hvobs demo`
# on the embedded in-process bus (no server needed). Extra arguments go to `hvobs demo`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/bootstrap.sh
source "$here/bootstrap.sh"

ensure_venv
exec "$venv/bin/hvobs" demo "$@"
