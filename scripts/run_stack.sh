#!/usr/bin/env bash
# Start the stack of docker-compose.yml as plain processes on this machine, for hosts without
# Docker: a Redis (AOF on, noeviction) on its own port and directory, two fleet simulators, two
# ring-metrics workers, the span worker (saga spans and the agents' spawn tree) and Prometheus
# (with deploy/prometheus's scrape configuration, targets rewritten to these processes, the alert
# and recording rules, and exemplar storage). Programs that are
# not installed (Grafana, an OpenTelemetry collector, Jaeger: not in Debian) are reported and
# skipped. Everything listens on 127.0.0.1; logs and data go to one state directory.
#
#   scripts/run_stack.sh                 run until Ctrl-C
#   scripts/run_stack.sh --check         start, wait until Prometheus scrapes every target and
#                                        the alert rules evaluate, print a summary, stop
#   scripts/run_stack.sh --duration 60   run for 60 seconds
#
# Redis loads deploy/redis/users.acl (or HVOBS_REDIS_ACL_FILE) like the compose stack: the
# simulators append as "producer", the workers run as "worker", with HVOBS_PRODUCER_PASSWORD and
# HVOBS_WORKER_PASSWORD (default: the development passwords that file holds), handed over in
# HVOBS_REDIS_URL so they stay out of the process list.
#
# Ports (environment): HVOBS_REDIS_PORT (6390), HVOBS_SIM_PORTS ("8000 8001"),
# HVOBS_RING_PORTS ("9101 9103"), HVOBS_SPANS_PORT (9102, the saga-span worker's /metrics),
# HVOBS_PROMETHEUS_PORT (9090); HVOBS_STACK_DIR (a new temporary directory). Without the hvobs
# workers installed the simulators keep their events in process and serve the ring metrics
# themselves.
#
# Every port is checked free before anything starts (a Redis already on HVOBS_REDIS_PORT is
# never used: the stack's Redis is one it starts, with its data, users and settings), and each
# process must be alive and listening on its own port before the next one starts; the stack is
# reported up only then. Any failure is one line naming the process and its log, and stops the
# processes already started.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${HVOBS_VENV:-$root/.venv}"
py="$venv/bin/python"
hvobs="$venv/bin/hvobs"
host=127.0.0.1
redis_port="${HVOBS_REDIS_PORT:-6390}"
read -r -a sim_ports <<<"${HVOBS_SIM_PORTS:-8000 8001}"
read -r -a ring_ports <<<"${HVOBS_RING_PORTS:-9101 9103}"
spans_port="${HVOBS_SPANS_PORT:-9102}"
prom_port="${HVOBS_PROMETHEUS_PORT:-9090}"
state="${HVOBS_STACK_DIR:-$(mktemp -d -t hvobs-stack.XXXXXX)}"
mode=run
duration=0

while [ $# -gt 0 ]; do
    case "$1" in
        --check) mode=check ;;
        --duration) duration="$2"; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "run_stack: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ ! -x "$py" ]; then
    echo "run_stack: no virtualenv at $venv (run scripts/test.sh or set HVOBS_VENV)" >&2
    exit 1
fi
mkdir -p "$state"
pids=()
names=()

up=()

start() {
    local name="$1"
    shift
    "$@" >"$state/$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
    echo "run_stack: started $name (pid $!, log $state/$name.log)"
}

# bound NAME PORT [TIMEOUT]: the process started last must be alive and listening on PORT.
bound() {
    local name="$1" port="$2" timeout="${3:-30}"
    "$py" "$here/stack_check.py" bound --name "$name" --pid "${pids[-1]}" --port "$port" \
        --timeout "$timeout" --log "$state/$name.log" || exit 1
    up+=("$name=$host:$port")
}

stop_all() {
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[$i]}" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    echo "run_stack: stopped; logs and data in $state"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

wait_http() {
    local url="$1" tries="${2:-100}"
    for ((i = 0; i < tries; i++)); do
        if "$py" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
            "$url" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    echo "run_stack: $url did not answer" >&2
    return 1
}

# -- ports ---------------------------------------------------------------------------------------
with_redis=false
if command -v redis-server >/dev/null 2>&1 && "$hvobs" worker --help >/dev/null 2>&1; then
    with_redis=true
fi
wanted=()
if $with_redis; then
    wanted+=("redis:$redis_port:HVOBS_REDIS_PORT")
    for i in "${!ring_ports[@]}"; do
        wanted+=("ring-metrics-$((i + 1)):${ring_ports[$i]}:HVOBS_RING_PORTS")
    done
    wanted+=("saga-spans:$spans_port:HVOBS_SPANS_PORT")
fi
for i in "${!sim_ports[@]}"; do
    wanted+=("simulator-$((i + 1)):${sim_ports[$i]}:HVOBS_SIM_PORTS")
done
if command -v prometheus >/dev/null 2>&1; then
    wanted+=("prometheus:$prom_port:HVOBS_PROMETHEUS_PORT")
fi
"$py" "$here/stack_check.py" free --host "$host" "${wanted[@]}" || exit 1

# -- Redis ---------------------------------------------------------------------------------------
redis_url=""
producer_url=""
worker_url=""
acl_file="${HVOBS_REDIS_ACL_FILE:-$root/deploy/redis/users.acl}"
if $with_redis; then
    mkdir -p "$state/redis"
    start redis redis-server --bind "$host" --port "$redis_port" --dir "$state/redis" \
        --appendonly yes --appendfsync everysec --maxmemory-policy noeviction --save "" \
        --aclfile "$acl_file"
    bound redis "$redis_port"
    redis_url="redis://$host:$redis_port/0"
    producer_url="redis://producer:${HVOBS_PRODUCER_PASSWORD:-hvobs-dev-producer}@$host:$redis_port/0"
    worker_url="redis://worker:${HVOBS_WORKER_PASSWORD:-hvobs-dev-worker}@$host:$redis_port/0"
else
    echo "run_stack: redis-server or the hvobs workers missing: simulators run in process"
fi

# -- simulators ----------------------------------------------------------------------------------
fleets=(east west)
sim_targets=()
for i in "${!sim_ports[@]}"; do
    args=(-m hypervisor.observability.demo.simulate --host "$host" --port "${sim_ports[$i]}"
        --fleet "${fleets[$i]:-fleet$((i + 1))}" --seed "$((i + 1))")
    if [ "$i" -gt 0 ]; then args+=(--agents 4 --breach-rate 0.2); fi
    # An empty HVOBS_REDIS_URL keeps the simulator's events in process.
    HVOBS_REDIS_URL="$producer_url" start "simulator-$((i + 1))" "$py" "${args[@]}"
    bound "simulator-$((i + 1))" "${sim_ports[$i]}"
    sim_targets+=("$host:${sim_ports[$i]}")
done

# -- workers -------------------------------------------------------------------------------------
ring_targets=()
if [ -n "$redis_url" ]; then
    for i in "${!ring_ports[@]}"; do
        HVOBS_REDIS_URL="$worker_url" start "ring-metrics-$((i + 1))" "$hvobs" worker ring-metrics \
            --group ring --consumer "ring-$((i + 1))" --metrics-host "$host" \
            --metrics-port "${ring_ports[$i]}"
        bound "ring-metrics-$((i + 1))" "${ring_ports[$i]}"
        ring_targets+=("$host:${ring_ports[$i]}")
    done
    span_args=(worker saga-spans --group spans --consumer spans-1 --agent-spans
        --jsonl "$state/spans.jsonl" --metrics-host "$host" --metrics-port "$spans_port")
    otlp=""
    for collector in otelcol-contrib otelcol; do
        if command -v "$collector" >/dev/null 2>&1; then
            start otel-collector "$collector" --config "$root/deploy/otel-collector/config.yaml"
            bound otel-collector 4318 60
            otlp="http://$host:4318"
            break
        fi
    done
    if [ -n "$otlp" ] && "$hvobs" worker saga-spans --help 2>/dev/null | grep -q -- --otlp-endpoint
    then
        span_args+=(--otlp-endpoint "$otlp")
    else
        echo "run_stack: no OpenTelemetry collector here: saga spans go to $state/spans.jsonl"
    fi
    HVOBS_REDIS_URL="$worker_url" start saga-spans "$hvobs" "${span_args[@]}"
    bound saga-spans "$spans_port"
fi

for target in "${sim_targets[@]}"; do wait_http "http://$target/metrics"; done

# -- Prometheus ----------------------------------------------------------------------------------
if command -v prometheus >/dev/null 2>&1; then
    mkdir -p "$state/prometheus"
    cp "$root/deploy/prometheus/rules.yml" "$state/prometheus/rules.yml"
    spans_target=""
    if [ -n "$redis_url" ]; then spans_target="$host:$spans_port"; fi
    "$py" - "$root/deploy/prometheus/prometheus.yml" "$state/prometheus/prometheus.yml" \
        "${ring_targets[*]:-}" "${sim_targets[*]}" "$spans_target" <<'PY'
import sys

import yaml

source, dest, ring, sims, spans = sys.argv[1:6]
config = yaml.safe_load(open(source))
jobs = {job["job_name"]: job for job in config["scrape_configs"]}
kept = []
if ring.strip():
    # Workers serve the ring metrics; the simulators the governance metrics.
    jobs["agent-hypervisor"]["static_configs"] = [{"targets": ring.split()}]
    jobs["agent-simulator"]["static_configs"] = [{"targets": sims.split()}]
    jobs["hvobs-span-workers"]["static_configs"] = [{"targets": spans.split()}]
    kept = [jobs["agent-hypervisor"], jobs["agent-simulator"], jobs["hvobs-span-workers"]]
else:
    # In-process simulators serve both: one job, so no series is scraped twice.
    jobs["agent-hypervisor"]["static_configs"] = [{"targets": sims.split()}]
    kept = [jobs["agent-hypervisor"]]
config["scrape_configs"] = kept
yaml.safe_dump(config, open(dest, "w"), sort_keys=False)
PY
    if command -v promtool >/dev/null 2>&1; then
        promtool check config "$state/prometheus/prometheus.yml" >/dev/null
    fi
    if [ "$mode" = check ]; then
        sed -i 's/^  scrape_interval: .*/  scrape_interval: 1s/; s/^  evaluation_interval: .*/  evaluation_interval: 1s/' \
            "$state/prometheus/prometheus.yml"
    fi
    start prometheus prometheus --config.file="$state/prometheus/prometheus.yml" \
        --storage.tsdb.path="$state/prometheus/data" --web.listen-address="$host:$prom_port" \
        --enable-feature=exemplar-storage
    bound prometheus "$prom_port"
    wait_http "http://$host:$prom_port/-/ready" 150
    echo "run_stack: Prometheus on http://$host:$prom_port (alerts: /alerts)"
else
    echo "run_stack: prometheus not installed (apt-get install prometheus): skipped"
fi
for program in grafana-server jaeger-all-in-one; do
    command -v "$program" >/dev/null 2>&1 ||
        echo "run_stack: $program not installed: skipped (see docs/operations.md)"
done

echo "run_stack: up: ${up[*]}"

if [ "$mode" = check ]; then
    "$py" - "http://$host:$prom_port" <<'PY'
import json
import sys
import time
import urllib.parse
import urllib.request

base = sys.argv[1]


def get(path):
    with urllib.request.urlopen(base + path, timeout=5) as response:
        return json.loads(response.read())["data"]


deadline = time.monotonic() + 90
targets = []
while time.monotonic() < deadline:
    targets = get("/api/v1/targets")["activeTargets"]
    if targets and all(t["health"] == "up" for t in targets):
        break
    time.sleep(1)
else:
    sys.exit(f"run_stack: targets not up: {[(t['scrapeUrl'], t['health']) for t in targets]}")
print(f"run_stack: {len(targets)} targets up")
queries = {
    "ring transitions": "sum(max without (instance) (agent_hypervisor_ring_transitions_total))",
    "breaches": "sum(max without (instance) (agent_hypervisor_ring_breaches_total))",
    "policy decisions": "sum(agent_governance_policy_decisions_total)",
}
for name, expr in queries.items():
    while True:
        result = get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["result"]
        if result or time.monotonic() > deadline:
            break
        time.sleep(1)
    if not result:
        sys.exit(f"run_stack: no data for {name}: {expr}")
    print(f"run_stack: {name}: {float(result[0]['value'][1]):.0f}")
while time.monotonic() < deadline:
    alerts = get("/api/v1/alerts")["alerts"]
    if any(a["labels"]["alertname"] == "HighRingBreachRate" for a in alerts):
        break
    time.sleep(1)
exemplars = []
while True:
    window = {"start": time.time() - 3600, "end": time.time() + 60}
    query = {"query": "agent_hypervisor_ring_breaches_total", **window}
    exemplars = [
        e for series in get("/api/v1/query_exemplars?" + urllib.parse.urlencode(query))
        for e in series["exemplars"]
    ]
    if exemplars or time.monotonic() > deadline:
        break
    time.sleep(1)
if not exemplars:
    sys.exit("run_stack: no exemplars on agent_hypervisor_ring_breaches_total")
print(f"run_stack: breach exemplars: {len(exemplars)}, e.g. trace_id={exemplars[-1]['labels']['trace_id']}")
names = sorted({(a["labels"]["alertname"], a["state"]) for a in get("/api/v1/alerts")["alerts"]})
print(f"run_stack: alerts {names}")
PY
    exit 0
fi

if [ "$duration" != 0 ]; then
    sleep "$duration"
else
    echo "run_stack: running; Ctrl-C stops everything"
    wait -n "${pids[@]}" || true
    echo "run_stack: a process exited; stopping"
fi
