#!/usr/bin/env bash
# Every scenario of docs/benchmarks.md (a to e), in one run, one
# after the other, so the tables come from one machine on one day. Each
# scenario's report goes to its own file in OUT; about 50 minutes on a quiet
# 2-core machine, most of it Pushpin and the 9,900-subscriber runs.
#
#   bench/all.sh                    # every scenario
#   SCENARIOS="c e" bench/all.sh    # some of them
#   bench/tables.py "$OUT"          # the tables of docs/benchmarks.md
#
# Knobs (environment):
#   SCENARIOS   any of a1 a2 b c d e, in this order      (default all)
#   OUT         where the reports go        (default bench-results-<date>)
#   QUIET_WAIT  passed on to each script                 (default 30)
#
# A scenario that fails is reported and the others still run; the exit
# status says whether all of them ran to the end.
set -uo pipefail

cd "$(dirname "$0")/.."
SCENARIOS=${SCENARIOS:-"a1 a2 b c d e"}
OUT=${OUT:-bench-results-$(date +%Y%m%d-%H%M)}
export QUIET_WAIT=${QUIET_WAIT:-30}
mkdir -p "$OUT"

# scenario NAME SCRIPT VAR=VALUE...: runs bench/SCRIPT with the settings,
# its report in OUT/NAME.txt.
failures=0
scenario() {
    local name=$1 script=$2
    shift 2
    printf '%s: %s bench/%s\n' "$name" "$*" "$script" | tee "$OUT/$name.txt"
    if ! env "$@" "bench/$script" >>"$OUT/$name.txt" 2>&1; then
        printf '%s: failed; see %s\n' "$name" "$OUT/$name.txt" >&2
        failures=$((failures + 1))
    fi
}

for name in $SCENARIOS; do
    case $name in
    # (a) broadcast on one channel: rising rates until a server fails the
    # bar, at 1,000 subscribers; at 9,900 (past what anyone holds under
    # 50 ms here) every rate for every server, with the floor beside them.
    a1) scenario a1 broadcast.sh TARGETS="pushgate nchan pushpin floor" TRANSPORTS="sse ws" \
        SUBSCRIBERS=1000 RATES="10 20 50 100 200 400 800 1600" DURATION=10 SEARCH=1 ;;
    a2) scenario a2 broadcast.sh TARGETS="pushgate nchan floor" TRANSPORTS="sse ws" \
        SUBSCRIBERS=9900 RATES="1 5 10 20 50 100" DURATION=10
        # Pushpin falls behind from 5/s on (its publish path is the bound).
        scenario a2-pushpin broadcast.sh TARGETS=pushpin TRANSPORTS="sse ws" \
            SUBSCRIBERS=9900 RATES="1 5" DURATION=10 ;;
    # (b) 10,000 subscribers on 10,000 channels.
    b) scenario b broadcast.sh TARGETS="pushgate nchan pushpin" TRANSPORTS="sse ws" \
        SUBSCRIBERS=10000 CHANNELS=10000 RATES="2000 5000" DURATION=10 ;;
    # (c) idle memory per connection at 15,000 connections, and at 5,000
    # for the slope (what one more connection costs, without the server's
    # own idle footprint).
    c) scenario c broadcast.sh TARGETS="pushgate nchan pushpin" TRANSPORTS="sse ws" \
        SUBSCRIBERS="5000 15000" RATES=1 DURATION=3 ;;
    # (d) authenticated connects per second: 60,000 per row, a few seconds
    # for pushgate and Nchan (20,000 swing by up to a third between rows),
    # 20,000 for Pushpin (a minute).
    d) scenario d connect.sh TARGETS="pushgate nchan pushpin" TRANSPORTS="ws sse" \
        CONCURRENCY="200 20" CONNECTIONS=60000 PUSHPIN_CONNECTIONS=20000 ;;
    # (e) pass-through beside direct, nginx and Pushpin.
    e) scenario e passthrough.sh ROUNDS=3 ;;
    *) echo "all.sh: unknown scenario $name (a1 a2 b c d e)" >&2; exit 64 ;;
    esac
done
echo "reports in $OUT"
((failures == 0))
