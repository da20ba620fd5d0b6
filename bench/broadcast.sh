#!/usr/bin/env bash
# Broadcast benchmark: many SSE or WebSocket subscribers on one channel,
# publications at a steady rate; pushgate, and Nchan beside it in the same
# run (TARGETS="pushgate nchan"; Nchan from bench/nchan.conf, needs nginx and
# libnginx-mod-nchan).
#
#   bench/broadcast.sh
#
# Knobs (environment):
#   TARGETS       "pushgate" (add nchan for the peer)
#   TRANSPORTS    "sse ws"
#   SUBSCRIBERS   subscriber counts, one row set each      (default "1000 9900")
#   RATES         publications per second                  (default "5 10 20")
#   DURATION      seconds of publishing per run            (default 10)
#   CONNECT_RATE  new connections per second               (default 2000)
#   BIND_IPS      client source addresses                  (default 127.0.0.2-127.0.0.9)
#   THREADS       load generator runtime threads           (default 1)
#   QUIET_WAIT    before each run, wait up to this many seconds for the
#                 machine to be idle                       (default 60)
#
# Columns: deliveries per second over the publishing window (until the last
# delivery); delivery ratio = received / (subscribers x published); latency
# percentiles from publish (the payload's "t") to receipt, in ms; gaps, dups,
# reorders in each subscriber's sequence; "drop" = subscribers that failed to
# connect or were disconnected; pushgate's RSS (MiB) idle after connecting and
# its peak under load; CPU in % of one core of pushgate, of the load generator,
# and of everything else on the machine ("other%": well above a few %, other
# work shared the 2 cores and the row is not comparable).
#
# Every run gets a fresh pushgate (so its RSS is that run's alone) and a fresh
# set of subscribers. With the defaults: 12 runs, about 3 minutes once built
# on a quiet machine (plus up to QUIET_WAIT per run on a busy one).
# pushgate sizes its connection limit from the open-file limit (one file per
# realtime connection, about 19,400 here); one load generator holds 9,900 easily.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

TARGETS=${TARGETS:-pushgate}
TRANSPORTS=${TRANSPORTS:-"sse ws"}
SUBSCRIBERS=${SUBSCRIBERS:-"1000 9900"}
RATES=${RATES:-"5 10 20"}
DURATION=${DURATION:-10}
CONNECT_RATE=${CONNECT_RATE:-2000}
BIND_IPS=${BIND_IPS:-127.0.0.2-127.0.0.9}
THREADS=${THREADS:-1}
QUIET_WAIT=${QUIET_WAIT:-60}

log() { printf '%s\n' "$*" >&2; }
die() { log "broadcast.sh: $*"; exit 1; }

log "building pushgate and pushgate-bench (release)"
cargo build --release --quiet -p pushgate -p pushgate-bench
PUSHGATE=$ROOT/target/release/pushgate
BENCH=$ROOT/target/release/pushgate-bench

WORK=$(mktemp -d -t pushgate-broadcast.XXXXXX)
pushgate_pid=

stop_pushgate() {
    if [[ -n $pushgate_pid ]] && kill -0 "$pushgate_pid" 2>/dev/null; then
        # SIGQUIT: nginx's graceful stop; pushgate takes SIGTERM.
        kill -QUIT "$pushgate_pid" 2>/dev/null || true
        kill -TERM "$pushgate_pid" 2>/dev/null || true
        wait "$pushgate_pid" 2>/dev/null || true
    fi
    pushgate_pid=
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_pushgate
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for FILE REGEX PID WHAT: waits until FILE has a line matching REGEX
# and prints it; fails if PID dies or 10 s pass.
wait_for() {
    local file=$1 regex=$2 pid=$3 what=$4 line
    for _ in $(seq 200); do
        if line=$(grep -m1 -E "$regex" "$file" 2>/dev/null); then
            printf '%s\n' "$line"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    log "$what did not start; its output:"
    cat "$file" >&2 || true
    return 1
}

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
realtime:
  max_connections_per_ip: 100000
history:
  size: 100
limits:
  max_connections: 0         # the most the open-file limit allows
log:
  level: info                # warn would hide the "listening" line
YAML

# start_nchan: nginx with bench/nchan.conf; sets pushgate_pid (nginx's
# master, stopped like pushgate), PUBLIC and API (both nginx), PIDS (master
# and workers, whose RSS and CPU are summed).
start_nchan() {
    local port dir=$WORK/nchan
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rm -rf "$dir" && mkdir -p "$dir"
    sed "s|@DIR@|$dir|g; s|@LISTEN@|127.0.0.1:$port|" "$ROOT/bench/nchan.conf" >"$dir/nchan.conf"
    nginx -p "$dir" -c "$dir/nchan.conf" >"$dir/out.log" 2>&1 &
    pushgate_pid=$!
    for _ in $(seq 100); do
        [[ -s $dir/nginx.pid ]] && curl -s -o /dev/null "http://127.0.0.1:$port/pub/probe" && break
        sleep 0.05
    done
    PUBLIC=127.0.0.1:$port
    API=$PUBLIC
    PIDS="$pushgate_pid $(pgrep -P "$pushgate_pid" | tr '\n' ' ')"
}

# start_pushgate: sets pushgate_pid, PUBLIC and API.
start_pushgate() {
    PUSHGATE_LOG__FORMAT=json "$PUSHGATE" --config "$WORK/pushgate.yaml" 2>"$WORK/pushgate.log" >&2 &
    pushgate_pid=$!
    local line
    line=$(wait_for "$WORK/pushgate.log" '"message":"listening"' "$pushgate_pid" "pushgate")
    PUBLIC=$(sed -E 's/.*"addr":"([^"]+)".*/\1/' <<<"$line")
    API=$(sed -E 's/.*"api_addr":"([^"]+)".*/\1/' <<<"$line")
    PIDS=$pushgate_pid
    [[ $PUBLIC =~ ^127\.0\.0\.1:[0-9]+$ && $API =~ ^127\.0\.0\.1:[0-9]+$ ]] ||
        die "no addresses in pushgate's line: $line"
}

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain -- src Cargo.toml 2>/dev/null) ]]; then
    commit="$commit (with uncommitted changes in src/)"
fi
cat <<INFO
machine:  $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r), open files $(ulimit -n)
pushgate: $commit ($PUSHGATE)
runs:     transports "$TRANSPORTS", subscribers "$SUBSCRIBERS", rates "$RATES"/s, ${DURATION}s each,
          connect rate $CONNECT_RATE/s, client addresses $BIND_IPS, $THREADS load-generator thread(s)

INFO

# wait_quiet: waits (up to QUIET_WAIT seconds) until the machine is nearly
# idle, since other work on the cores would take CPU from pushgate.
HZ=$(getconf CLK_TCK)
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
wait_quiet() {
    local waited=0 before after
    while ((waited < QUIET_WAIT)); do
        before=$(busy_ticks)
        sleep 1
        after=$(busy_ticks)
        ((after - before <= HZ / 5)) && break
        waited=$((waited + 1))
    done
    ((waited == 0)) || log "waited ${waited}s for the machine to be quiet"
}

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
header=true
run=0
for transport in $TRANSPORTS; do
    for subs in $SUBSCRIBERS; do
        for rate in $RATES; do
          for target in $TARGETS; do
            run=$((run + 1))
            wait_quiet
            "start_$target"
            pid_args=()
            for pid in $PIDS; do pid_args+=(--pid "$pid"); done
            out=$("$BENCH" broadcast --target "$target" --public "$PUBLIC" --api "$API" --key "$api_key" \
                --transport "$transport" --subscribers "$subs" --channel "bench-$run" \
                --rate "$rate" --duration "$DURATION" --connect-rate "$CONNECT_RATE" \
                --bind-ips "$BIND_IPS" "${pid_args[@]}" --threads "$THREADS" \
                --header "$header" 2>"$WORK/bench.err") || {
                cat "$WORK/bench.err" >&2
                die "the load generator failed (run $run: $target, $transport, $subs subscribers, $rate/s)"
            }
            header=false
            grep -v '^{' <<<"$out"
            grep '^{' <<<"$out" >>"$RESULTS"
            grep -q 'first problem' "$WORK/bench.err" && sed -n 's/^broadcast: first problem: /    first problem: /p' "$WORK/bench.err"
            stop_pushgate
          done
        done
    done
done

echo
echo "JSON, one line per run:"
cat "$RESULTS"
