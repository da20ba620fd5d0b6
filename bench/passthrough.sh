#!/usr/bin/env bash
# Proxy pass-through benchmark: wrk against the test upstream directly,
# through pushgate, through nginx, and through Pushpin, in one run on one
# machine, all in front of the same upstream process.
#
#   bench/passthrough.sh
#   TARGETS="direct pushgate nginx" bench/passthrough.sh
#
# Knobs (environment):
#   TARGETS      in this order in every round  (default "direct pushgate nginx pushpin");
#                "baseline" is pushgate run from the binary BASELINE names
#                (another build, to take turns with this tree's)
#   CONNECTIONS  wrk connection counts, one row set each   (default "64 256")
#   DURATION     each measured wrk run                      (default 10s)
#   WARMUP       unmeasured wrk run before each measurement (default 2s)
#   THREADS      wrk threads                                (default 2)
#   TLS          1: pushgate and nginx terminate TLS (a self-signed
#                certificate made here with openssl; wrk keeps each
#                connection, so this measures the records, not handshakes);
#                direct stays plain and Pushpin is not run  (default 0)
#   ROUNDS       repeat the three targets this many times; with more than
#                one, medians per target follow, over the undisturbed
#                rounds                                     (default 1)
#   QUIET_WAIT   before each run, wait up to this many seconds for the
#                machine to be idle                         (default 120)
#   MAX_OTHER    measure a run again (3 tries in all) when other work took
#                more than this % of one core during it; a run still over it
#                is marked "disturbed"                      (default 10)
#
# "cpu us" is the CPU time (user + system, in microseconds) the process under
# test spent per request: the upstream for direct, the proxy otherwise.
# The "other %" column is the CPU (% of one core) the machine spent outside
# wrk and the servers during a run: well above a few %, other work shared the
# cores and the row is not comparable.
#
# Installs wrk, nginx and pushpin with apt-get when missing. nginx runs
# bench/nginx-passthrough.conf; Pushpin bench/pushpin/ (via bench/lib.sh),
# whose route sends every request to the upstream (plain HTTP requests are
# proxied as they are). Every port is ephemeral;
# every process started here is stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

CONNECTIONS=${CONNECTIONS:-"64 256"}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-1}
QUIET_WAIT=${QUIET_WAIT:-120}
MAX_OTHER=${MAX_OTHER:-10}
TLS=${TLS:-0}
if [[ $TLS == 1 ]]; then
    read -r -a TARGETS <<<"${TARGETS:-direct pushgate nginx}"
else
    read -r -a TARGETS <<<"${TARGETS:-direct pushgate nginx pushpin}"
fi
for target in "${TARGETS[@]}"; do
    case $target in direct | pushgate | nginx | pushpin) ;;
    baseline) [[ -x ${BASELINE:-} ]] || { echo "target baseline needs BASELINE=<a pushgate binary>" >&2 && exit 1; } ;;
    *) echo "unknown target $target" >&2 && exit 1 ;;
    esac
done
wants() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }
if [[ $TLS == 1 ]] && wants pushpin; then
    echo "TLS=1 measures pushgate and nginx; leave pushpin out of TARGETS" >&2 && exit 1
fi

SCRIPT=passthrough.sh
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

# --- tools ------------------------------------------------------------------
export PATH=$PATH:/usr/sbin:/sbin
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx)
command -v python3 >/dev/null || missing+=(python3)
command -v pgrep >/dev/null || missing+=(procps)
if [[ $TLS == 1 ]]; then command -v openssl >/dev/null || missing+=(openssl); fi
if wants pushpin; then command -v pushpin >/dev/null || missing+=(pushpin); fi
install_missing "${missing[@]}"

build_release

# --- processes and cleanup --------------------------------------------------
WORK=$(mktemp -d -t pushgate-passthrough.XXXXXX)
pids=()
nginx_pid=

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # nginx stops gracefully on SIGQUIT and takes its workers with it.
    if [[ -n $nginx_pid ]] && kill -0 "$nginx_pid" 2>/dev/null; then
        kill -QUIT "$nginx_pid" 2>/dev/null || true
    fi
    stop_pids "${pids[@]}"
    [[ -z $nginx_pid ]] || wait "$nginx_pid" 2>/dev/null || true
    cleanup_servers # Pushpin
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the upstream -----------------------------------------------------------
"$BENCH" upstream --listen 127.0.0.1:0 >"$WORK/upstream.out" 2>&1 &
upstream_pid=$!
pids+=("$upstream_pid")
line=$(wait_for "$WORK/upstream.out" '^listening on ' "$upstream_pid" "the upstream")
UPSTREAM=${line#listening on }

# --- pushgate -----------------------------------------------------------------
# The API is not measured, but needs a port and a key to start.
api_key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
cat >"$WORK/pushgate.yaml" <<EOF
listen: 127.0.0.1:0
upstream:
  url: http://$UPSTREAM
api:
  listen: 127.0.0.1:0
  keys: ["$api_key"]
log:
  level: info   # warn would hide the "listening" line this script reads
EOF
SCHEME=http
if [[ $TLS == 1 ]]; then
    SCHEME=https
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
        -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null
    cat >>"$WORK/pushgate.yaml" <<EOF
tls:
  cert: $WORK/tls.crt
  key: $WORK/tls.key
EOF
fi
# bench/lib.sh's start_pushgate sets SERVER_PID and PUBLIC.
start_pushgate "$WORK/pushgate.yaml"
pushgate_pid=$SERVER_PID
pids+=("$pushgate_pid")
PUSHGATE_ADDR=$PUBLIC
BASELINE_ADDR=
baseline_pid=
if wants baseline; then
    PUSHGATE=$BASELINE start_pushgate "$WORK/pushgate.yaml" baseline
    baseline_pid=$SERVER_PID
    pids+=("$baseline_pid")
    BASELINE_ADDR=$PUBLIC
fi

# --- nginx --------------------------------------------------------------------
# The port is free when asked but could be taken before nginx binds it: retry.
NGINX_ADDR=
for attempt in 1 2 3 4 5; do
    port=$(free_port)
    listen="127.0.0.1:$port"
    if [[ $TLS == 1 ]]; then
        listen="$listen ssl; ssl_certificate $WORK/tls.crt; ssl_certificate_key $WORK/tls.key"
    fi
    sed -e "s|@DIR@|$WORK|g" -e "s|@UPSTREAM@|$UPSTREAM|g" -e "s|@LISTEN@|$listen|g" \
        "$ROOT/bench/nginx-passthrough.conf" >"$WORK/nginx.conf"
    : >"$WORK/nginx-error.log"
    nginx -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" &
    nginx_pid=$!
    for _ in $(seq 100); do
        if ! kill -0 "$nginx_pid" 2>/dev/null; then
            break
        fi
        if python3 -c "import socket, sys; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
            NGINX_ADDR=127.0.0.1:$port
            break
        fi
        sleep 0.05
    done
    [[ -n $NGINX_ADDR ]] && break
    wait "$nginx_pid" 2>/dev/null || true
    nginx_pid=
    log "nginx did not start on port $port (attempt $attempt):"
    cat "$WORK/nginx-error.log" >&2
done
[[ -n $NGINX_ADDR ]] || die "nginx would not start"

# --- Pushpin ------------------------------------------------------------------
# In front of the same upstream (bench/lib.sh; stopped by cleanup_servers).
PUSHPIN_ADDR=
PUSHPIN_PIDS=()
if wants pushpin; then
    start_pushpin "$UPSTREAM"
    PUSHPIN_ADDR=$PUBLIC
    read -r -a PUSHPIN_PIDS <<<"$PIDS"
fi

# --- sanity: every target answers the upstream's body -------------------------
declare -A URL=(
    [direct]=http://$UPSTREAM/bench
    [pushgate]=$SCHEME://$PUSHGATE_ADDR/bench
    [baseline]=$SCHEME://$BASELINE_ADDR/bench
    [nginx]=$SCHEME://$NGINX_ADDR/bench
    [pushpin]=http://$PUSHPIN_ADDR/bench
)
for target in "${TARGETS[@]}"; do
    # The certificate is self-signed: not checked here (nor by wrk).
    body=$(python3 -c "import ssl, sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5, context=ssl._create_unverified_context()).read().decode())" "${URL[$target]}") ||
        die "$target (${URL[$target]}) does not answer"
    [[ $body == '{"ok":true,"n":42}' ]] || die "$target answered an unexpected body: $body"
done

# --- the machine and the versions -------------------------------------------
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    commit="$commit (with uncommitted changes in src/)"
fi
cat <<EOF
machine:  $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r)
pushgate: $commit ($PUSHGATE)
nginx:    $(nginx -v 2>&1 | sed 's/^nginx version: //'), 2 workers, upstream keepalive 256
tls:      $(if [[ $TLS == 1 ]]; then echo "pushgate and nginx terminate TLS (self-signed P-256 certificate; $(openssl version | cut -d" " -f1-2))"; else echo "off"; fi)
pushpin:  $(if wants pushpin; then pushpin --version 2>&1; else echo "not run"; fi), bench/pushpin/ (runner, condure, zurl, pushpin-proxy, pushpin-handler)
wrk:      $( (wrk --version 2>&1 || true) | head -1 | awk '{print $2}'), $THREADS threads, $DURATION per run after a $WARMUP warm-up
upstream: $UPSTREAM  pushgate: $PUSHGATE_ADDR  nginx: $NGINX_ADDR  pushpin: ${PUSHPIN_ADDR:--}
load:     $(cut -d' ' -f1-3 /proc/loadavg)

EOF

# --- load ---------------------------------------------------------------------
# to_ms VALUE: wrk's "812.00us", "4.51ms" or "1.02s" in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.2f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.2f", v * 1000 }
        else printf "?"
    }'
}

# CPU accounting, so a run disturbed by other work on the machine shows it:
# "other %" is the CPU (in % of one core) the machine spent outside wrk and
# the three servers during a measured run.
NGINX_PIDS=("$nginx_pid")
mapfile -t -O 1 NGINX_PIDS < <(pgrep -P "$nginx_pid")
SERVER_PIDS=("$upstream_pid" "$pushgate_pid" ${baseline_pid:+"$baseline_pid"} "${NGINX_PIDS[@]}" "${PUSHPIN_PIDS[@]}")
# The process(es) under test for each target, whose CPU per request is shown.
declare -A TARGET_PIDS=(
    [direct]=$upstream_pid
    [pushgate]=$pushgate_pid
    [baseline]=$baseline_pid
    [nginx]="${NGINX_PIDS[*]}"
    [pushpin]="${PUSHPIN_PIDS[*]}"
)

RESULTS=$WORK/results
: >"$RESULTS"
printf '%-6s %-9s %-6s %10s %9s %9s %8s %8s %8s\n' conns target round 'req/s' 'p50 ms' 'p99 ms' 'cpu us' errors 'other %'
for conns in $CONNECTIONS; do
    for round in $(seq "$ROUNDS"); do
        for target in "${TARGETS[@]}"; do
            url=${URL[$target]}
            # A run during which other work took more than MAX_OTHER % of a
            # core is measured again (up to 3 times in all).
            for attempt in 1 2 3; do
                wait_quiet
                wrk -t"$THREADS" -c"$conns" -d"$WARMUP" "$url" >/dev/null
                child_ticks
                wrk0=$CHILD_TICKS
                busy0=$(busy_ticks) servers0=$(ticks "${SERVER_PIDS[@]}")
                # shellcheck disable=SC2086 # a list of PIDs
                target0=$(ticks ${TARGET_PIDS[$target]})
                out=$(wrk -t"$THREADS" -c"$conns" -d"$DURATION" --latency "$url")
                child_ticks
                wrk1=$CHILD_TICKS
                busy1=$(busy_ticks) servers1=$(ticks "${SERVER_PIDS[@]}")
                # shellcheck disable=SC2086
                target1=$(ticks ${TARGET_PIDS[$target]})
                seconds=$(awk '/requests in/ {sub(/s,$/, "", $4); print $4}' <<<"$out")
                other=$(awk -v t=$(((busy1 - busy0) - (servers1 - servers0) - (wrk1 - wrk0))) \
                    -v hz="$HZ" -v s="$seconds" 'BEGIN {v = 100 * t / hz / s; printf "%.0f", v < 0 ? 0 : v}')
                ((other <= MAX_OTHER)) && break
                ((attempt == 3)) || log "$target c=$conns: other work took ${other}% of a core; measuring again"
            done
            rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
            requests=$(awk '/requests in/ {print $1}' <<<"$out")
            cpu=$(awk -v t=$((target1 - target0)) -v hz="$HZ" -v n="$requests" 'BEGIN {printf "%.1f", 1e6 * t / hz / n}')
            p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
            p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
            # Socket errors (connect/read/write/timeout) plus non-2xx answers.
            errors=$(awk '/Socket errors:/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10}
                          /Non-2xx or 3xx responses:/ {n += $5}
                          END {print n + 0}' <<<"$out")
            printf '%-6s %-9s %-6s %10s %9s %9s %8s %8s %8s%s\n' "$conns" "$target" "$round" "$rps" "$p50" "$p99" \
                "$cpu" "$errors" "$other" "$( ((other <= MAX_OTHER)) || echo '  disturbed')"
            echo "$conns $target $rps $p50 $p99 $cpu $errors $other" >>"$RESULTS"
        done
    done
done

# median CONNS TARGET COLUMN: the median of one column of $RESULTS, over the
# rounds other work left alone (all rounds when none was).
median() {
    awk -v c="$1" -v t="$2" -v col="$3" -v max="$MAX_OTHER" '
        $1 == c && $2 == t { all[++n] = $col; if ($8 <= max) clean[++m] = $col }
        END { if (m) for (i = 1; i <= m; i++) print clean[i]; else for (i = 1; i <= n; i++) print all[i] }
    ' "$RESULTS" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

if ((ROUNDS > 1)); then
    echo
    echo "median of $ROUNDS rounds, each column on its own, leaving out rounds with other % over $MAX_OTHER"
    echo "(unless every round of that row was disturbed)"
    printf '%-6s %-9s %10s %9s %9s %8s\n' conns target 'req/s' 'p50 ms' 'p99 ms' 'cpu us'
    for conns in $CONNECTIONS; do
        for target in "${TARGETS[@]}"; do
            printf '%-6s %-9s %10.0f %9.2f %9.2f %8.1f\n' "$conns" "$target" \
                "$(median "$conns" "$target" 3)" "$(median "$conns" "$target" 4)" \
                "$(median "$conns" "$target" 5)" "$(median "$conns" "$target" 6)"
        done
    done
fi
