#!/usr/bin/env bash
# rpc through pushgate against the same calls as plain HTTP through its
# proxy: one pushgate node in front of the bench app (which answers every
# path alike), the same connection counts, one call in flight per
# connection for both (HTTP/1 allows no more), then rpc with more.
#
#   bench/rpc.sh
#
# Knobs (environment):
#   CONNECTIONS   connection counts, in turn        (default "1 32")
#   IN_FLIGHT     rpc calls per WebSocket, extra runs (default 8)
#   DURATION      seconds per run                   (default 10)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

CONNECTIONS=${CONNECTIONS:-"1 32"}
IN_FLIGHT=${IN_FLIGHT:-8}
DURATION=${DURATION:-10}

SCRIPT=rpc.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

build_release

WORK=$(mktemp -d -t pushgate-rpc.XXXXXX)
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

start_upstream
pids+=("$UPSTREAM_PID")
api_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
cat >"$WORK/pushgate.yaml" <<YAML
listen: 127.0.0.1:0
upstream:
  url: http://$UPSTREAM
api:
  listen: 127.0.0.1:0
  keys: ["$api_key"]
auth:
  mode: upstream
rpc:
  path: /bench/rpc
  max_in_flight: 64
realtime:
  commands_per_second: 100000
  command_burst: 100000
  connects_per_second: 100000
  connect_burst: 100000
log:
  level: info                # warn would hide the "listening" line
YAML
PUSHGATE_LOG__FORMAT=json "$PUSHGATE" --config "$WORK/pushgate.yaml" 2>"$WORK/pushgate.log" >&2 &
pid=$!
pids+=("$pid")
line=$(wait_for "$WORK/pushgate.log" '"message":"listening"' "$pid" "pushgate") || die "pushgate did not start"
public=$(sed -E 's/.*"addr":"([^"]+)".*/\1/' <<<"$line")

cat <<INFO
machine:  $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r)
pushgate: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), one node, auth.mode upstream, the bench app behind it
runs:     connections "$CONNECTIONS", ${DURATION}s each

INFO
for connections in $CONNECTIONS; do
    "$BENCH" rpc --public "$public" --mode http --connections "$connections" --duration "$DURATION"
    "$BENCH" rpc --public "$public" --mode rpc --connections "$connections" --duration "$DURATION"
    "$BENCH" rpc --public "$public" --mode rpc --connections "$connections" --in-flight "$IN_FLIGHT" --duration "$DURATION"
done
