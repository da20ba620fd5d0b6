#!/usr/bin/env bash
# What waiting for a replica costs: one pushgate node on a Redis master
# with one replica, publishing with engine.redis.wait_replicas 0 (answered
# once the master stored it) and 1 (answered once the replica holds it),
# the same load for each.
#
#   bench/replicated.sh
#
# Knobs (environment):
#   TRANSPORT     sse | ws                                 (default ws)
#   SUBSCRIBERS   in all                                   (default 1000)
#   CHANNELS      subscriber i on channel i mod CHANNELS   (default 100)
#   PUBLISHERS    publishing connections                   (default 16)
#   RATES         publications per second                  (default "1000 5000")
#   WAITS         wait_replicas values to compare          (default "0 1")
#   DURATION      seconds of publishing per run            (default 10)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

TRANSPORT=${TRANSPORT:-ws}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
CHANNELS=${CHANNELS:-100}
PUBLISHERS=${PUBLISHERS:-16}
RATES=${RATES:-"1000 5000"}
WAITS=${WAITS:-"0 1"}
DURATION=${DURATION:-10}

SCRIPT=replicated.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

command -v redis-server >/dev/null || die "redis-server is needed (apt-get install redis-server)"
build_release

WORK=$(mktemp -d -t pushgate-replicated.XXXXXX)
pids=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_pids "${pids[@]}"
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

MASTER=$(free_port)
REPLICA=$(free_port)
mkdir -p "$WORK/master" "$WORK/replica"
redis-server --port "$MASTER" --bind 127.0.0.1 --save "" --dir "$WORK/master" >"$WORK/master.log" 2>&1 &
pids+=($!)
redis-server --port "$REPLICA" --bind 127.0.0.1 --save "" --dir "$WORK/replica" \
    --replicaof 127.0.0.1 "$MASTER" >"$WORK/replica.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
    redis-cli -p "$REPLICA" INFO replication 2>/dev/null | grep -q master_link_status:up && break
    sleep 0.05
done
redis-cli -p "$REPLICA" INFO replication | grep -q master_link_status:up || die "the replica never linked up"

api_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')

# start_node WAIT: prints "PID PUBLIC API".
start_node() {
    local wait=$1 line
    cat >"$WORK/pushgate-$wait.yaml" <<YAML
listen: 127.0.0.1:0
upstream:
  url: http://127.0.0.1:9    # never called: auth.mode none, no pass-through
api:
  listen: 127.0.0.1:0
  keys: ["$api_key"]
auth:
  mode: none
engine:
  kind: redis
  redis:
    url: redis://127.0.0.1:$MASTER
    wait_replicas: $wait
realtime:
  max_connections_per_ip: 100000
  connects_per_second: 1000000
  connect_burst: 1000000
log:
  level: info
YAML
    PUSHGATE_LOG__FORMAT=json "$PUSHGATE" --config "$WORK/pushgate-$wait.yaml" 2>"$WORK/node-$wait.log" >&2 &
    local pid=$!
    line=$(wait_for "$WORK/node-$wait.log" '"message":"listening"' "$pid" "node (wait $wait)") || die "the node did not start"
    echo "$pid $(sed -E 's/.*"addr":"([^"]+)".*/\1/' <<<"$line") $(sed -E 's/.*"api_addr":"([^"]+)".*/\1/' <<<"$line")"
}

cat <<INFO
machine:  $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r)
pushgate: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), one node on a redis-server $(redis-server --version | sed -E 's/.*v=([^ ]+).*/\1/') master with one replica
runs:     $TRANSPORT, $SUBSCRIBERS subscribers on $CHANNELS channels, $PUBLISHERS publishing connections, rates "$RATES"/s, ${DURATION}s each

INFO

run=0
header=true
for rate in $RATES; do
    for wait in $WAITS; do
        run=$((run + 1))
        read -r pid public api < <(start_node "$wait")
        pids+=("$pid")
        echo "wait_replicas: $wait"
        "$BENCH" broadcast --target pushgate --label "pushgate wait=$wait" --public "$public" --api "$api" \
            --key "$api_key" --transport "$TRANSPORT" --subscribers "$SUBSCRIBERS" \
            --channel "replicated-$run" --channels "$CHANNELS" --publishers "$PUBLISHERS" \
            --rate "$rate" --duration "$DURATION" --pid "$pid" --header "$header" | grep -v '^{'
        header=false
        if grep -q not_replicated "$WORK/node-$wait.log"; then
            echo "  (some publishes were answered 503 not_replicated: see the node's log)"
        fi
        stop_pids "$pid"
    done
done
