#!/usr/bin/env bash
# Print a Redis ACL file with the four hvobs roles on one stream (default hvobs:events, groups
# ring and spans, as in docker-compose.yml), each password hashed (#<sha256>), and a default
# user that may only PING (the compose health check). Passwords come from the environment, never
# from the command line:
#
#   HVOBS_PRODUCER_PASSWORD=... HVOBS_READER_PASSWORD=... HVOBS_WORKER_PASSWORD=... \
#   HVOBS_ADMIN_PASSWORD=... scripts/make_redis_users.sh [STREAM] > users.acl
#
# deploy/redis/users.acl is this script's output for the development passwords documented in
# docs/operations.md (tests/test_compose.py checks that it still is).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stream="${1:-hvobs:events}"
hvobs="$(command -v hvobs || echo "$here/../.venv/bin/hvobs")"

echo "user default reset on nopass resetchannels -@all +ping"
for role in producer reader worker admin; do
    variable="HVOBS_$(echo "$role" | tr '[:lower:]' '[:upper:]')_PASSWORD"
    if [ -z "${!variable:-}" ]; then
        echo "make_redis_users: set $variable" >&2
        exit 2
    fi
    groups=()
    if [ "$role" = worker ] || [ "$role" = admin ]; then groups=(--group ring --group spans); fi
    "$hvobs" acl --format aclfile --role "$role" --stream "$stream" --user "$role" \
        "${groups[@]}" --password-env "$variable"
done
