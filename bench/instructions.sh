#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the
# user-space work of pass-through (scenario e) as a number that does not
# move with the machine's load, for comparing builds, or pushgate with
# nginx, where wrk's rates swing by more than a change is worth.
#
#   bench/instructions.sh
#   TARGETS="pushgate baseline" BASELINE=<another pushgate binary> bench/instructions.sh
#
# Knobs (environment):
#   TARGETS    any of pushgate, baseline, nginx  (default "pushgate nginx")
#   REQUESTS   requests counted per target       (default 20000)
#   CLIENTS    keep-alive client connections     (default 4)
#   FIELDS     minimal: User-Agent and Accept; browser: the eight fields
#              a browser sends with a page request (Connection: keep-alive,
#              a cookie, Accept-Language...)                 (default minimal)
#   KEEP       a folder to copy each target's callgrind dump into, as
#              TARGET.callgrind, for callgrind_annotate (default: not kept)
#
# Each target runs under callgrind in front of `pushgate-bench upstream`
# (nginx as one process, `master_process off`, from
# bench/nginx-passthrough.conf). A Python client sends REQUESTS / 10
# unmeasured GETs of /bench (the path bench/passthrough.sh asks for; "/"
# is special to hyper's URI parser and would hide what a held path costs),
# callgrind's counters are zeroed, REQUESTS more are sent over CLIENTS
# connections, and the counters are dumped: every thread's
# instructions over those requests, divided by their number. Only user space
# is counted (the system calls' kernel side is not), and a `rep movs`/`stos`
# counts once per repetition, so large copies weigh more than their time.
# About a minute per target.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SCRIPT=instructions.sh
REQUESTS=${REQUESTS:-20000}
CLIENTS=${CLIENTS:-4}
KEEP=${KEEP:-}
FIELDS=${FIELDS:-minimal}
case $FIELDS in minimal | browser) ;; *) echo "FIELDS is minimal or browser" >&2 && exit 1 ;; esac
read -r -a TARGETS <<<"${TARGETS:-pushgate nginx}"
for target in "${TARGETS[@]}"; do
    case $target in pushgate | nginx) ;;
    baseline) [[ -x ${BASELINE:-} ]] || { echo "target baseline needs BASELINE=<a pushgate binary>" >&2 && exit 1; } ;;
    *) echo "unknown target $target" >&2 && exit 1 ;;
    esac
done

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
export PATH=$PATH:/usr/sbin:/sbin
missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
command -v python3 >/dev/null || missing+=(python3)
if [[ " ${TARGETS[*]} " == *" nginx "* ]]; then command -v nginx >/dev/null || missing+=(nginx); fi
install_missing "${missing[@]}"

build_release

WORK=$(mktemp -d -t pushgate-instructions.XXXXXX)
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

# load ADDR COUNT: COUNT GETs over CLIENTS keep-alive connections, each
# answer read whole and checked.
load() {
    python3 - "$1" "$2" "$CLIENTS" "$FIELDS" <<'EOF'
import http.client, sys, threading
host, port = sys.argv[1].rsplit(":", 1)
count, clients = int(sys.argv[2]), int(sys.argv[3])
fields = {"User-Agent": "instructions", "Accept": "*/*"}
if sys.argv[4] == "browser":
    fields = {
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "Accept-Language": "en-US,en;q=0.5",
        "Accept-Encoding": "gzip, deflate, br",
        "Connection": "keep-alive",
        "Cookie": "session=abc123; theme=dark",
        "Referer": "http://localhost/",
        "Upgrade-Insecure-Requests": "1",
    }
failed = []
def run(n):
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    for _ in range(n):
        conn.request("GET", "/bench", headers=fields)
        answer = conn.getresponse()
        answer.read()
        if answer.status != 200:
            failed.append(answer.status)
threads = [threading.Thread(target=run, args=(count // clients,)) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
if failed:
    sys.exit(f"{len(failed)} answers were not 200, first {failed[0]}")
EOF
}

# measure NAME ADDR PID: warm up, zero, load, dump; prints the count.
measure() {
    local name=$1 addr=$2 pid=$3 dump
    load "$addr" $((REQUESTS / 10))
    callgrind_control -z "$pid" >/dev/null 2>&1
    load "$addr" "$REQUESTS"
    callgrind_control -d "$pid" >/dev/null 2>&1
    for _ in $(seq 100); do
        dump=$(ls "$WORK/$name".callgrind.*.* 2>/dev/null | head -1)
        [[ -n $dump ]] && break
        sleep 0.1
    done
    [[ -n $dump ]] || die "$name: callgrind wrote no dump"
    if [[ -n $KEEP ]]; then
        mkdir -p "$KEEP"
        cp "$dump" "$KEEP/$name.callgrind"
    fi
    # The dump's totals line: instructions over the counted requests.
    awk '/^(summary|totals):/ {print $2; exit}' "$dump"
}

printf '%-10s %12s %14s\n' target requests instr/request
for target in "${TARGETS[@]}"; do
    case $target in
    pushgate | baseline)
        cat >"$WORK/$target.yaml" <<EOF
listen: 127.0.0.1:0
upstream:
  url: http://$UPSTREAM
api:
  listen: 127.0.0.1:0
  keys: ["$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"]
log:
  level: info   # warn would hide the "listening" line read here
EOF
        binary=$PUSHGATE
        [[ $target == baseline ]] && binary=$BASELINE
        # Under valgrind pushgate takes some seconds to start.
        PUSHGATE=$binary WAIT_TRIES=600 \
            RUN_UNDER="valgrind --tool=callgrind --callgrind-out-file=$WORK/$target.callgrind.%p" \
            start_pushgate "$WORK/$target.yaml" "$target"
        pid=$SERVER_PID
        pids+=("$pid")
        addr=$PUBLIC
        ;;
    nginx)
        port=$(free_port)
        sed -e "s|@DIR@|$WORK|g" -e "s|@UPSTREAM@|$UPSTREAM|g" -e "s|@LISTEN@|127.0.0.1:$port|g" \
            -e 's|^worker_processes 2;|worker_processes 1;\nmaster_process off;|' \
            "$ROOT/bench/nginx-passthrough.conf" >"$WORK/nginx.conf"
        valgrind --tool=callgrind --callgrind-out-file="$WORK/nginx.callgrind.%p" \
            nginx -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" >"$WORK/nginx.out" 2>&1 &
        pid=$!
        pids+=("$pid")
        addr=127.0.0.1:$port
        for _ in $(seq 200); do
            python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
            kill -0 "$pid" 2>/dev/null || die "nginx did not start: $(cat "$WORK/nginx-error.log")"
            sleep 0.1
        done
        ;;
    esac
    total=$(measure "$target" "$addr" "$pid")
    printf '%-10s %12d %14d\n' "$target" "$REQUESTS" $((total / REQUESTS))
    stop_pids "$pid"
done
