#!/usr/bin/env bash
# Broadcast benchmark: many SSE, WebSocket, long-poll or Pusher-protocol
# subscribers on one channel (or one channel each), publications at a steady
# rate; pushgate and its peers in the same run, one after the other
# (TARGETS="pushgate nchan pushpin"; Nchan from bench/nchan.conf, Pushpin
# from bench/pushpin/; both are installed with apt-get when missing).
#
#   bench/broadcast.sh
#   TARGETS="pushgate nchan pushpin" SUBSCRIBERS=10000 CHANNELS=10000 \
#     RATES="2000 5000" TRANSPORTS=sse bench/broadcast.sh       # many channels
#   SEARCH=1 RATES="5 10 20 40" bench/broadcast.sh             # rising rates
#   TRANSPORTS="ws pusher" bench/broadcast.sh                  # Pusher beside ws
#   TRANSPORTS=ws DEFLATE="0 1" PAYLOAD_SIZE=2048 bench/broadcast.sh   # compression off/on
#
# Knobs (environment):
#   TARGETS       servers, in this order in every round     (default pushgate);
#                 "baseline" is pushgate run from the binary BASELINE names
#                 (another build, to take turns with this tree's); "floor"
#                 is `pushgate-bench floor`, the least a server can do (one
#                 write per subscriber, no queues; SSE only): what the
#                 machine itself allows
#   TRANSPORTS    "sse ws" (poll: long-poll; Pushpin is measured on sse and
#                 ws only and skipped for poll; pusher: pushgate's Pusher
#                 protocol 7 at /app/{key}, published through its signed
#                 Pusher HTTP API, pushgate and baseline only). Without
#                 SEARCH the transports take turns at each count and rate,
#                 as the servers do
#   SUBSCRIBERS   subscriber counts, one row set each      (default "1000 9900")
#   CHANNELS      channels; 1 = all subscribers on one     (default 1)
#   PUBLISHERS    publishing connections (at most CHANNELS) (default 1, or 16
#                 when CHANNELS > 1)
#   RATES         publications per second, in all          (default "5 10 20")
#   DURATION      seconds of publishing per run            (default 10)
#   PAYLOAD_SIZE  each publication's JSON padded to about this many bytes
#                 with rows of a made-up price feed; 0: `{"seq","t"}` alone,
#                 about 30 bytes                           (default 0)
#   DEFLATE       "0 1": WebSocket subscribers without and with a
#                 permessage-deflate offer (as browsers make), taking turns
#                 like the transports; 1 applies to ws only (default 0)
#   CONNECT_RATE  new connections per second               (default 2000)
#   PUSHPIN_CONNECT_RATE  the same for Pushpin, whose every subscribe goes
#                 through the upstream; at 1,000/s some WebSocket-over-HTTP
#                 opens were answered 502                  (default 500)
#   SEARCH        1: for each server, transport and subscriber count, run
#                 RATES in rising order until a rate fails (delivery ratio
#                 below MIN_RATIO, p99 above MAX_P99_MS, or publishing took
#                 over 5 % longer than DURATION), then report the highest
#                 rate that held                           (default 0)
#   MIN_RATIO     (default 0.999)   MAX_P99_MS (default 50)
#   BIND_IPS      client source addresses                  (default 127.0.0.2-127.0.0.9)
#   THREADS       load generator runtime threads           (default 1)
#   QUIET_WAIT    before each run, wait up to this many seconds for the
#                 machine to be idle                       (default 60)
#   SERVER_CPU    confine each server to this percentage of one core (a
#                 cgroup CPU quota; needs root), so that it, not the load
#                 generator, runs out first: the curve past the server's own
#                 sustainable rate                          (default: no limit)
#
# Columns: deliveries per second over the publishing window (until the last
# delivery); delivery ratio = received / (subscribers x publications on their
# channel); latency percentiles from publish (the payload's "t") to receipt,
# in ms; gaps, dups, reorders in each subscriber's sequence; "drop" =
# subscribers that failed to connect or were disconnected; the server's RSS
# (MiB) idle after connecting and its peak under load; CPU in % of one core of
# the server (all its processes), of the load generator, and of everything
# else on the machine ("other%": well above a few %, other work shared the 2
# cores and the row is not comparable); the server's CPU per delivery in µs
# ("us/del") and the bytes subscribers read per delivery ("B/del", frames or
# SSE lines included; not counted for long-poll); per publication, the
# median time from publish to its first receipt ("1st-p50": the path to the
# first socket, plus any backlog the subscribers still had to read) and the
# p99 of the time from its first receipt to its last ("spr-p99": how long
# the fan-out took to reach everyone), in ms. The publishers run on a thread
# of their own, so a publish is never queued behind the subscribers' reads.
#
# Every run gets a fresh server (so its RSS is that run's alone) and a fresh
# set of subscribers. pushgate sizes its connection limit from the open-file
# limit (one file per realtime connection, about 19,400 here); one load
# generator holds 10,000 easily.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SCRIPT=broadcast.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

TARGETS=${TARGETS:-pushgate}
TRANSPORTS=${TRANSPORTS:-"sse ws"}
SUBSCRIBERS=${SUBSCRIBERS:-"1000 9900"}
CHANNELS=${CHANNELS:-1}
if ((CHANNELS > 1)); then PUBLISHERS=${PUBLISHERS:-16}; else PUBLISHERS=${PUBLISHERS:-1}; fi
RATES=${RATES:-"5 10 20"}
DURATION=${DURATION:-10}
PAYLOAD_SIZE=${PAYLOAD_SIZE:-0}
DEFLATE=${DEFLATE:-0}
CONNECT_RATE=${CONNECT_RATE:-2000}
PUSHPIN_CONNECT_RATE=${PUSHPIN_CONNECT_RATE:-500}
SEARCH=${SEARCH:-0}
MIN_RATIO=${MIN_RATIO:-0.999}
MAX_P99_MS=${MAX_P99_MS:-50}
BIND_IPS=${BIND_IPS:-127.0.0.2-127.0.0.9}
THREADS=${THREADS:-1}
QUIET_WAIT=${QUIET_WAIT:-60}

need_targets

build_release

WORK=$(mktemp -d -t pushgate-broadcast.XXXXXX)
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
pusher_app=bench
pusher_key=bench-key
pusher_secret=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
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
  connects_per_second: 1000000
  connect_burst: 1000000
history:
  size: 100
limits:
  max_connections: 0         # the most the open-file limit allows
log:
  level: info                # warn would hide the "listening" line
YAML
# Only when measured: a BASELINE from before the Pusher protocol would
# refuse the section.
if [[ " $TRANSPORTS " == *" pusher "* ]]; then
    cat >>"$WORK/pushgate.yaml" <<YAML
pusher:                      # TRANSPORTS=pusher: /app/$pusher_key, /apps/$pusher_app/events
  apps:
    - id: "$pusher_app"
      key: "$pusher_key"
      secret: "$pusher_secret"
YAML
fi

start_target() {
    case $1 in
    pushgate) start_pushgate "$WORK/pushgate.yaml" ;;
    baseline) PUSHGATE=$BASELINE start_pushgate "$WORK/pushgate.yaml" ;;
    floor) start_floor ;;
    nchan) start_nchan ;;
    pushpin) start_pushpin ;;
    esac
}

cat <<INFO
machine:  $(machine_info)
$(versions)
runs:     targets "$TARGETS", transports "$TRANSPORTS", subscribers "$SUBSCRIBERS" on $CHANNELS channel(s),
          rates "$RATES"/s over $PUBLISHERS publishing connection(s), ${DURATION}s each,
          payload ${PAYLOAD_SIZE:-0} bytes (0: bare), permessage-deflate offered: "$DEFLATE",
          connect rate $CONNECT_RATE/s (Pushpin $PUSHPIN_CONNECT_RATE/s), client addresses $BIND_IPS,
          $THREADS load-generator thread(s)$( ((SEARCH)) && printf '\n%s' "          search: rising rates until ratio < $MIN_RATIO, p99 > $MAX_P99_MS ms or the rate not kept")

INFO

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
header=true
run=0

# measure TARGET TRANSPORT SUBS RATE [DEFLATE]: one run on a fresh server;
# prints the row, appends the JSON line to RESULTS and leaves it in LAST.
measure() {
    local target=$1 transport=$2 subs=$3 rate=$4 out connect_rate=$CONNECT_RATE pid_args=() deflate_args=()
    local label=$target
    [[ ${5:-0} == 1 ]] && deflate_args=(--deflate) && label=$target+deflate
    run=$((run + 1))
    [[ $target == pushpin ]] && connect_rate=$PUSHPIN_CONNECT_RATE
    wait_quiet
    start_target "$target"
    confine_server
    for pid in $PIDS; do pid_args+=(--pid "$pid"); done
    local kind=$target
    [[ $target == baseline ]] && kind=pushgate
    [[ $target == floor ]] && kind=nchan
    out=$(timeout $((DURATION * 10 + 300)) "$BENCH" broadcast --target "$kind" --label "$label" \
        --public "$PUBLIC" --api "$API" --key "$api_key" \
        --pusher-app "$pusher_app" --pusher-key "$pusher_key" --pusher-secret "$pusher_secret" \
        --transport "$transport" --subscribers "$subs" --channel "bench-$run" \
        --channels "$CHANNELS" --publishers "$PUBLISHERS" \
        --rate "$rate" --duration "$DURATION" --connect-rate "$connect_rate" \
        --bind-ips "$BIND_IPS" "${pid_args[@]}" --threads "$THREADS" \
        --payload-size "$PAYLOAD_SIZE" "${deflate_args[@]}" \
        --header "$header" 2>"$WORK/bench.err") || {
        cat "$WORK/bench.err" >&2
        die "the load generator failed (run $run: $target, $transport, $subs subscribers, $rate/s)"
    }
    header=false
    grep -v '^{' <<<"$out"
    LAST=$(grep '^{' <<<"$out")
    printf '%s\n' "$LAST" >>"$RESULTS"
    sed -n 's/^broadcast: first problem: /    first problem: /p' "$WORK/bench.err"
    stop_server
}

# held: whether the last run met the search's bar: the delivery ratio, the
# p99, and the rate itself. pushgate and Nchan answer a publication once it
# is handed to the subscribers, so a server that falls behind slows the
# publisher down instead of losing anything; publishing that took over 5 %
# longer than DURATION did not hold the rate either.
held() {
    jq -e --argjson r "$MIN_RATIO" --argjson p "$MAX_P99_MS" --argjson d "$DURATION" \
        '.delivery_ratio >= $r and .latency_ms.p99 <= $p and .publish_secs <= $d * 1.05' \
        <<<"$LAST" >/dev/null
}

# skip TARGET TRANSPORT: whether the target does not speak the transport
# (Pushpin long-poll, the floor anything but SSE, a peer Pusher's protocol).
skip() {
    [[ $1 == pushpin && $2 == poll ]] || [[ $1 == floor && $2 != sse ]] ||
        [[ $2 == pusher && $1 != pushgate && $1 != baseline ]]
}

SUMMARY=$WORK/search.txt
: >"$SUMMARY"
if ((SEARCH)); then
    for transport in $TRANSPORTS; do
        for subs in $SUBSCRIBERS; do
            # Every server that still holds gets the next rate, so the servers
            # take turns at each rate as in the plain runs.
            declare -A best=() failed=()
            for rate in $(tr ' ' '\n' <<<"$RATES" | sort -g); do
                for target in $TARGETS; do
                    skip "$target" "$transport" && continue
                    [[ -n ${failed[$target]:-} ]] && continue
                    measure "$target" "$transport" "$subs" "$rate"
                    if held; then best[$target]=$rate; else failed[$target]=$rate; fi
                done
            done
            for target in $TARGETS; do
                skip "$target" "$transport" && continue
                printf '%-8s %-6s %6s subscribers: highest rate held %s/s (failed at %s)\n' \
                    "$target" "$transport" "$subs" "${best[$target]:-none}" \
                    "${failed[$target]:-none}" >>"$SUMMARY"
            done
            unset best failed
        done
    done
else
    # The transports take turns like the servers, so a drift in what else
    # the machine does falls on all of them alike.
    for subs in $SUBSCRIBERS; do
        for rate in $RATES; do
            for transport in $TRANSPORTS; do
                for deflate in $DEFLATE; do
                    [[ $deflate == 1 && $transport != ws ]] && continue
                    for target in $TARGETS; do
                        skip "$target" "$transport" && continue
                        measure "$target" "$transport" "$subs" "$rate" "$deflate"
                    done
                done
            done
        done
    done
fi

if ((SEARCH)); then
    echo
    echo "Highest rate with delivery ratio >= $MIN_RATIO, p99 <= $MAX_P99_MS ms and the rate kept:"
    cat "$SUMMARY"
fi
echo
echo "load after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "JSON, one line per run:"
cat "$RESULTS"
