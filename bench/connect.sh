#!/usr/bin/env bash
# Authenticated connects per second: pushgate with auth.mode upstream in
# front of `pushgate-bench upstream` (which grants POST /realtime/auth from a
# `session=<name>` cookie), WebSocket connections opened, pinged and closed.
#
#   bench/connect.sh
#
# Runs, each on a fresh pushgate:
#   cache     grant cache on (cache_ttl 30s): same user (cache hits), distinct users
#   no-cache  cache_ttl 0s: same user, distinct users (every connect asks the app)
#
# Knobs (environment):
#   TRANSPORT     ws or sse                              (default ws)
#   CONNECTIONS   connections per run                    (default 20000)
#   CONCURRENCY   connections in progress at once        (default 200)
#   BIND_IPS      client source addresses                (default 127.0.0.2-127.0.0.9)
#   THREADS       load generator runtime threads         (default 1)
#
# Columns: connects/s = usable connections (WebSocket ping answered, or SSE
# `retry:` line) per second of the run; latency from TCP connect to usable,
# in ms; failures by kind. About 4 runs of a few seconds each once built.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

TRANSPORT=${TRANSPORT:-ws}
CONNECTIONS=${CONNECTIONS:-20000}
CONCURRENCY=${CONCURRENCY:-200}
BIND_IPS=${BIND_IPS:-127.0.0.2-127.0.0.9}
THREADS=${THREADS:-1}

SCRIPT=connect.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

log "building pushgate and pushgate-bench (release)"
cargo build --release --quiet -p pushgate -p pushgate-bench
PUSHGATE=$ROOT/target/release/pushgate
BENCH=$ROOT/target/release/pushgate-bench

WORK=$(mktemp -d -t pushgate-connect.XXXXXX)
pushgate_pid=
upstream_pid=

stop() {
    local pid=$1
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop "$pushgate_pid"
    stop "$upstream_pid"
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$BENCH" upstream --listen 127.0.0.1:0 >"$WORK/upstream.out" 2>&1 &
upstream_pid=$!
line=$(wait_for "$WORK/upstream.out" '^listening on ' "$upstream_pid" "the test upstream")
UPSTREAM=${line#listening on }

api_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')

# start_with_cache CACHE_TTL: pushgate with that auth.upstream.cache_ttl;
# sets pushgate_pid and PUBLIC.
start_with_cache() {
    cat >"$WORK/pushgate.yaml" <<YAML
listen: 127.0.0.1:0
upstream:
  url: http://$UPSTREAM
api:
  listen: 127.0.0.1:0        # unused here
  keys: ["$api_key"]
auth:
  mode: upstream
  upstream:
    path: /realtime/auth
    cache_ttl: $1
realtime:
  max_connections_per_ip: 100000
limits:
  max_connections: 0         # the most the open-file limit allows
  connections_per_user: 0    # unlimited: one user holds many at once
log:
  level: info                # warn would hide the "listening" line
YAML
    PUSHGATE_LOG__FORMAT=json "$PUSHGATE" --config "$WORK/pushgate.yaml" 2>"$WORK/pushgate.log" >&2 &
    pushgate_pid=$!
    local line
    line=$(wait_for "$WORK/pushgate.log" '"message":"listening"' "$pushgate_pid" "pushgate")
    PUBLIC=$(sed -E 's/.*"addr":"([^"]+)".*/\1/' <<<"$line")
    [[ $PUBLIC =~ ^127\.0\.0\.1:[0-9]+$ ]] || die "no address in pushgate's line: $line"
}

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain -- src Cargo.toml 2>/dev/null) ]]; then
    commit="$commit (with uncommitted changes in src/)"
fi
cat <<INFO
machine:  $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r), open files $(ulimit -n)
pushgate: $commit ($PUSHGATE), auth.mode upstream -> pushgate-bench upstream at $UPSTREAM
runs:     $TRANSPORT, $CONNECTIONS connections, $CONCURRENCY at a time, client addresses $BIND_IPS,
          $THREADS load-generator thread(s)

INFO

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
header=true
for cache in 30s 0s; do
    label=cache
    [[ $cache == 0s ]] && label=no-cache
    start_with_cache "$cache"
    for users in same distinct; do
        flag=()
        [[ $users == distinct ]] && flag=(--distinct-users)
        out=$(timeout 60 "$BENCH" connect --public "$PUBLIC" --transport "$TRANSPORT" \
            --connections "$CONNECTIONS" --concurrency "$CONCURRENCY" "${flag[@]}" \
            --bind-ips "$BIND_IPS" --threads "$THREADS" --label "$label" \
            --header "$header" 2>"$WORK/bench.err") || {
            cat "$WORK/bench.err" >&2
            die "the load generator failed ($label, $users users)"
        }
        header=false
        grep -v '^{' <<<"$out"
        grep '^{' <<<"$out" >>"$RESULTS"
        sed -n 's/^connect: first problem: /    first problem: /p' "$WORK/bench.err"
    done
    stop "$pushgate_pid"
    pushgate_pid=
done

echo
echo "JSON, one line per run:"
cat "$RESULTS"
