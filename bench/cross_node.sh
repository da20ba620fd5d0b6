#!/usr/bin/env bash
# Cross-node fan-out on the Redis engine: two pushgate nodes share one
# redis-server; subscribers are split over both nodes, publications go in
# through node A's API, so half of every delivery crosses Redis.
#
#   bench/cross_node.sh
#
# Knobs (environment):
#   TRANSPORT     sse | ws                                 (default ws)
#   SUBSCRIBERS   in all, half on each node                (default 10000)
#   RATES         publications per second                  (default "5 10 20")
#   DURATION      seconds of publishing per run            (default 10)
#   CONNECT_RATE  new connections per second, per shard    (default 1000)
#   BIND_IPS      client source addresses                  (default 127.0.0.2-127.0.0.9)
#
# Two load-generator processes (one per node, 5,000 sockets each) stay under
# the 20,000 open files a process may hold here. Besides the load
# generator's rows, it prints what Redis executed per publication, from
# INFO commandstats: the round trips (EVALSHA) and the commands the script
# ran inside, against the number of publications.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

TRANSPORT=${TRANSPORT:-ws}
SUBSCRIBERS=${SUBSCRIBERS:-10000}
RATES=${RATES:-"5 10 20"}
DURATION=${DURATION:-10}
CONNECT_RATE=${CONNECT_RATE:-1000}
BIND_IPS=${BIND_IPS:-127.0.0.2-127.0.0.9}

SCRIPT=cross_node.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

command -v redis-server >/dev/null || die "redis-server is needed (apt-get install redis-server)"
build_release

WORK=$(mktemp -d -t pushgate-cross.XXXXXX)
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

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --dir "$WORK" >"$WORK/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
    sleep 0.05
done
redis() { redis-cli -p "$REDIS_PORT" "$@"; }

api_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
cat >"$WORK/pushgate.yaml" <<YAML
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
    url: redis://127.0.0.1:$REDIS_PORT
realtime:
  max_connections_per_ip: 100000
  connects_per_second: 1000000
  connect_burst: 1000000
log:
  level: info
YAML

# start_node NAME: prints "PID PUBLIC API".
start_node() {
    local name=$1 line
    PUSHGATE_LOG__FORMAT=json "$PUSHGATE" --config "$WORK/pushgate.yaml" 2>"$WORK/$name.log" >&2 &
    local pid=$!
    line=$(wait_for "$WORK/$name.log" '"message":"listening"' "$pid" "node $name") || die "node $name did not start"
    echo "$pid $(sed -E 's/.*"addr":"([^"]+)".*/\1/' <<<"$line") $(sed -E 's/.*"api_addr":"([^"]+)".*/\1/' <<<"$line")"
}

# stat NAME: the calls of one command in INFO commandstats (0 if none).
stat() {
    redis INFO commandstats | tr -d '\r' |
        sed -n "s/^cmdstat_$1:calls=\([0-9]*\),.*/\1/p" | head -1 | grep . || echo 0
}
total_calls() {
    redis INFO commandstats | tr -d '\r' |
        sed -n 's/^cmdstat_[a-z|]*:calls=\([0-9]*\),.*/\1/p' | awk '{s += $1} END {print s + 0}'
}

cat <<INFO
machine:  $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r)
pushgate: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), two nodes on one redis-server $(redis-server --version | sed -E 's/.*v=([^ ]+).*/\1/')
runs:     $TRANSPORT, $SUBSCRIBERS subscribers (half per node), rates "$RATES"/s, ${DURATION}s each

INFO

run=0
header=true
for rate in $RATES; do
    run=$((run + 1))
    read -r a_pid a_public a_api < <(start_node "a$run")
    read -r b_pid b_public b_api < <(start_node "b$run")
    pids+=("$a_pid" "$b_pid")
    channel="cross-$run"
    redis CONFIG RESETSTAT >/dev/null
    common=(broadcast --target pushgate --api "$a_api" --key "$api_key" --transport "$TRANSPORT"
        --subscribers "$SUBSCRIBERS" --channel "$channel" --rate "$rate" --duration "$DURATION"
        --connect-rate "$CONNECT_RATE" --bind-ips "$BIND_IPS" --count-api "$a_api" --count-api "$b_api")
    "$BENCH" "${common[@]}" --public "$b_public" --shard 1/2 --pid "$b_pid" --header false \
        >"$WORK/shard1.out" 2>"$WORK/shard1.err" &
    shard1=$!
    out=$("$BENCH" "${common[@]}" --public "$a_public" --shard 0/2 --pid "$a_pid" --header "$header" \
        2>"$WORK/shard0.err") || { cat "$WORK/shard0.err" >&2; die "shard 0 failed (rate $rate)"; }
    wait "$shard1" || { cat "$WORK/shard1.err" >&2; die "shard 1 failed (rate $rate)"; }
    header=false
    published=$(awk -v r="$rate" -v d="$DURATION" 'BEGIN {print int(r * d)}')
    echo "node A (publishes, $((SUBSCRIBERS / 2)) subscribers):"
    grep -v '^{' <<<"$out"
    echo "node B (hears through Redis, $((SUBSCRIBERS - SUBSCRIBERS / 2)) subscribers):"
    grep -v '^{' "$WORK/shard1.out" || true
    printf 'redis during the run: %d publications; EVALSHA %d (history reads of %d subscribes included), PUBLISH %d, XADD %d; all commands %d\n' \
        "$published" "$(stat evalsha)" "$SUBSCRIBERS" "$(stat publish)" "$(stat xadd)" "$(total_calls)"
    # Commands per publication alone: 100 more, nothing else going on.
    redis CONFIG RESETSTAT >/dev/null
    for i in $(seq 100); do
        curl -fsS -o /dev/null -H "Authorization: Bearer $api_key" -H 'Content-Type: application/json' \
            -d "{\"channel\":\"$channel\",\"data\":$i}" "http://$a_api/api/publish"
    done
    printf 'redis per publication (100 publications): %s round trip(s) (EVALSHA), %s commands executed in all\n\n' \
        "$(awk -v n="$(stat evalsha)" 'BEGIN {print n / 100}')" \
        "$(awk -v n="$(total_calls)" 'BEGIN {print n / 100}')"
    stop_pids "$a_pid" "$b_pid"
done
