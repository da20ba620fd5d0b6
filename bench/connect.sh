#!/usr/bin/env bash
# Authenticated connects per second: realtime connections opened, found
# usable and closed, each one allowed or refused by the same test upstream
# (`pushgate-bench upstream`: a `session=<name>` cookie is allowed, none is
# refused with 401). pushgate and its peers in the same run, one after the
# other (TARGETS="pushgate nchan pushpin"; both peers are installed with
# apt-get when missing):
#
#   pushgate  auth.mode upstream: its grant request POST /realtime/auth
#   nchan     bench/nchan-auth.conf: nchan_authorize_request, a subrequest
#             proxied as POST /realtime/auth
#   pushpin   bench/pushpin/: every connect passed to the upstream, which
#             answers a GRIP hold (SSE) or accepts the WebSocket-over-HTTP
#             OPEN with the cookie, 401 without
#
#   bench/connect.sh
#   TARGETS="pushgate nchan pushpin" TRANSPORTS="ws sse" bench/connect.sh
#
# Runs, each on a fresh server with a fresh upstream, for every transport:
#   pushgate  cache     grant cache on (cache_ttl 30s): same user (cache hits), distinct users
#   pushgate  no-cache  cache_ttl 0s: same user, distinct users (every connect asks the app)
#   nchan     none      no grant cache (every connect asks the app): same user, distinct users
#   pushpin   none      no grant cache (every connect asks the app): same user, distinct users
# Before each run, the server gets 20 connects without a cookie, which must
# all be refused (the upstream decides, not a default).
#
# Knobs (environment):
#   TARGETS       servers, in this order                 (default pushgate);
#                 "baseline" is pushgate run from the binary BASELINE names
#                 (another build, measured the same way as this tree's)
#   TRANSPORTS    ws and/or sse                          (default $TRANSPORT or ws)
#   CONNECTIONS   connections per run                    (default 20000)
#   PUSHPIN_CONNECTIONS  the same for Pushpin, which takes about a
#                 minute for 20,000                      (default $CONNECTIONS)
#   CONCURRENCY   connections in progress at once; a list gives one row
#                 set each, on a fresh server            (default 200)
#   BIND_IPS      client source addresses                (default 127.0.0.2-127.0.0.9)
#   THREADS       load generator runtime threads         (default 1)
#   QUIET_WAIT    before each run, wait up to this many seconds for the
#                 machine to be idle                     (default 60)
#   MAX_OTHER     measure a run again (3 tries in all) when other work took
#                 more than this % of one core           (default 10)
#
# Columns: connects/s = usable connections (WebSocket: 101 and the pong to a
# ping frame; SSE: 200, text/event-stream and the first block of the stream)
# per second of the run; latency from TCP connect to usable, and to the
# response head ("head"), in ms; failures by kind; CPU in % of one core of
# the server (all its processes), the upstream, the load generator, the
# kernel's interrupt and softirq time ("irq%": loopback TCP work that /proc
# charges to no process; 10-30 % of a core at 20,000-30,000 connects/s), and
# everything else on the machine ("other%").
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SCRIPT=connect.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

TARGETS=${TARGETS:-pushgate}
TRANSPORTS=${TRANSPORTS:-${TRANSPORT:-ws}}
CONNECTIONS=${CONNECTIONS:-20000}
PUSHPIN_CONNECTIONS=${PUSHPIN_CONNECTIONS:-$CONNECTIONS}
CONCURRENCY=${CONCURRENCY:-200}
BIND_IPS=${BIND_IPS:-127.0.0.2-127.0.0.9}
THREADS=${THREADS:-1}
QUIET_WAIT=${QUIET_WAIT:-60}
MAX_OTHER=${MAX_OTHER:-10}

export PATH=$PATH:/usr/sbin:/sbin
need_targets

build_release

WORK=$(mktemp -d -t pushgate-connect.XXXXXX)
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    cleanup_servers
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

api_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')

# pushgate_config CACHE_TTL: pushgate in front of $UPSTREAM with that
# auth.upstream.cache_ttl.
pushgate_config() {
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
  connects_per_second: 1000000
  connect_burst: 1000000
limits:
  max_connections: 0         # the most the open-file limit allows
  connections_per_user: 0    # unlimited: one user holds many at once
log:
  level: info                # warn would hide the "listening" line
YAML
}

# start_target TARGET CACHE: a fresh test upstream and the server in front
# of it.
start_target() {
    case $1 in
    pushgate)
        start_upstream
        pushgate_config "$2"
        start_pushgate "$WORK/pushgate.yaml"
        ;;
    baseline)
        start_upstream
        pushgate_config "$2"
        PUSHGATE=$BASELINE start_pushgate "$WORK/pushgate.yaml" baseline
        ;;
    nchan)
        start_upstream
        start_nchan "$ROOT/bench/nchan-auth.conf" "$UPSTREAM"
        ;;
    pushpin) start_pushpin ;;
    esac
}

cat <<INFO
machine:  $(machine_info)
$(versions)
runs:     targets "$TARGETS", transports "$TRANSPORTS", $CONNECTIONS connections (Pushpin $PUSHPIN_CONNECTIONS), "$CONCURRENCY" at a time,
          client addresses $BIND_IPS, $THREADS load-generator thread(s)

INFO

# irq_ticks: the machine's irq + softirq ticks so far.
irq_ticks() { awk '/^cpu / {print $7 + $8}' /proc/stat; }
pct() { awk -v t="$1" -v hz="$HZ" -v s="$2" 'BEGIN {v = 100 * t / hz / s; printf "%.0f", v < 0 ? 0 : v}'; }

# connect ARGS...: one run of the load generator against $PUBLIC; leaves its
# JSON line in LAST.
connect() {
    local out kind=$target
    [[ $target == baseline ]] && kind=pushgate
    out=$(timeout 300 "$BENCH" connect --target "$kind" --public "$PUBLIC" \
        --transport "$transport" --concurrency "$conc" --bind-ips "$BIND_IPS" \
        --threads "$THREADS" --header false "$@" 2>"$WORK/bench.err") || {
        cat "$WORK/bench.err" >&2
        die "the load generator failed ($target, $transport, $*)"
    }
    LAST=$(grep '^{' <<<"$out" | jq -c --arg target "$target" '.target = $target')
}

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
printf '%-8s %-4s %-8s %-8s %6s %5s %6s %10s %7s %7s %7s %7s %7s %5s %5s %5s %5s %6s  %s\n' \
    target tr cache users conns conc ok connects/s p50ms p99ms maxms head50 head99 srv% up% gen% irq% other% failures
for transport in $TRANSPORTS; do
    for target in $TARGETS; do
        caches=none
        [[ $target == pushgate || $target == baseline ]] && caches="30s 0s"
        for cache in $caches; do
            for conc in $CONCURRENCY; do
                label=$cache
                case $cache in 30s) label=cache ;; 0s) label=no-cache ;; esac
                for users in same distinct; do
                    flag=()
                    [[ $users == distinct ]] && flag=(--distinct-users)
                    for attempt in 1 2 3; do
                        wait_quiet
                        # A fresh server for every run: Pushpin slows down
                        # for a minute or two after many SSE connections.
                        start_target "$target" "$cache"
                        # Without a cookie every connect must be refused.
                        connect --connections 20 --no-cookie --label "$label"
                        refused=$(jq -r '[.ok, (.failures | to_entries | map("\(.key)=\(.value)") | join(","))] | @tsv' <<<"$LAST")
                        [[ $(cut -f1 <<<"$refused") == 0 ]] ||
                            die "$target $transport let a connection without a cookie in: $LAST"
                        ((attempt > 1)) || log "$target $transport $label c=$conc $users: 20 connects without a cookie refused ($(cut -f2 <<<"$refused"))"
                        child_ticks
                        gen0=$CHILD_TICKS
                        # shellcheck disable=SC2086
                        busy0=$(busy_ticks) irq0=$(irq_ticks) srv0=$(ticks $PIDS) up0=$(ticks "$UPSTREAM_PID")
                        conns=$CONNECTIONS
                        [[ $target == pushpin ]] && conns=$PUSHPIN_CONNECTIONS
                        connect --connections "$conns" "${flag[@]}" --label "$label"
                        child_ticks
                        gen1=$CHILD_TICKS
                        # shellcheck disable=SC2086
                        busy1=$(busy_ticks) irq1=$(irq_ticks) srv1=$(ticks $PIDS) up1=$(ticks "$UPSTREAM_PID")
                        secs=$(jq -r .secs <<<"$LAST")
                        srv=$(pct $((srv1 - srv0)) "$secs")
                        up=$(pct $((up1 - up0)) "$secs")
                        gen=$(pct $((gen1 - gen0)) "$secs")
                        irq=$(pct $((irq1 - irq0)) "$secs")
                        other=$(pct $(((busy1 - busy0) - (irq1 - irq0) - (srv1 - srv0) - (up1 - up0) - (gen1 - gen0))) "$secs")
                        stop_server
                        ((other <= MAX_OTHER)) && break
                        ((attempt == 3)) || log "$target $transport $label c=$conc $users: other work took ${other}% of a core; measuring again"
                    done
                    LAST=$(jq -c --argjson s "$srv" --argjson u "$up" --argjson g "$gen" --argjson i "$irq" --argjson o "$other" \
                        '. + {cpu_pct: {server: $s, upstream: $u, generator: $g, irq: $i, other: $o}}' <<<"$LAST")
                    printf '%s\n' "$LAST" >>"$RESULTS"
                    jq -r '[.target, .transport, .label, .users, .connections, .concurrency, .ok, .connects_per_sec,
                            .latency_ms.p50, .latency_ms.p99, .latency_ms.max,
                            .head_latency_ms.p50, .head_latency_ms.p99,
                            .cpu_pct.server, .cpu_pct.upstream, .cpu_pct.generator, .cpu_pct.irq, .cpu_pct.other,
                            (if .failed == 0 then "-" else (.failures | to_entries | map("\(.key)=\(.value)") | join(",")) end)]
                           | @tsv' <<<"$LAST" |
                        awk -F'\t' -v max="$MAX_OTHER" '{printf "%-8s %-4s %-8s %-8s %6d %5d %6d %10.0f %7.2f %7.2f %7.2f %7.2f %7.2f %5d %5d %5d %5d %6d  %s%s\n",
                            $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, ($18 > max ? "  disturbed" : "")}'
                    sed -n 's/^connect: first problem: /    first problem: /p' "$WORK/bench.err"
                done
            done
        done
    done
done

echo
echo "load after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "JSON, one line per run:"
cat "$RESULTS"
