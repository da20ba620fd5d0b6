# Shared by the bench/*.sh scripts: sourced, not run. Starts and stops the
# servers under test (pushgate, Nchan, Pushpin, the test upstream) on free
# ports in the foreground, each in its own folder under $WORK, and waits for a
# quiet machine.
#
# The caller sets ROOT (the repository), WORK (a temporary folder it removes)
# and SCRIPT (its name, for messages), and builds PUSHGATE and BENCH (the
# release binaries). Every start_* sets SERVER_PID (what stop_server stops),
# PUBLIC and API (host:port), and PIDS (the processes whose RSS and CPU the
# load generator sums); cleanup_servers stops whatever is still running.

log() { printf '%s\n' "$*" >&2; }
die() { log "$SCRIPT: $*"; exit 1; }

# free_port: a TCP port on 127.0.0.1 that nothing listens on (the kernel's
# pick for port 0; released again before the server binds it).
free_port() { free_ports 1; }

# free_ports N: N different such ports, one a line (all bound at once, so
# the kernel cannot hand out the same one twice).
free_ports() {
    python3 -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# wait_for FILE REGEX PID WHAT: waits until FILE has a line matching REGEX
# and prints it; fails if PID dies or 10 s pass (WAIT_TRIES=n: n / 20 s).
wait_for() {
    local file=$1 regex=$2 pid=$3 what=$4 line
    for _ in $(seq "${WAIT_TRIES:-200}"); do
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

# wait_http WHAT PID CURL-ARGS...: waits (10 s at most) until the server
# answers anything.
wait_http() {
    local what=$1 pid=$2
    shift 2
    for _ in $(seq 200); do
        curl -s -o /dev/null --max-time 1 "$@" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    die "$what did not answer ($*)"
}

# wait_quiet: waits (up to QUIET_WAIT seconds) until the machine is nearly
# idle (under 20 % of one core busy for a second), since other work on the
# cores would take CPU from the server under test.
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
wait_quiet() {
    local waited=0 before after hz
    hz=$(getconf CLK_TCK)
    while ((waited < ${QUIET_WAIT:-60})); do
        before=$(busy_ticks)
        sleep 1
        after=$(busy_ticks)
        ((after - before <= hz / 5)) && break
        waited=$((waited + 1))
    done
    ((waited == 0)) || log "waited ${waited}s for the machine to be quiet"
}

# machine_info: one line on the machine, for the report.
machine_info() {
    printf '%s CPUs, %s, Linux %s, open files %s, load %s\n' "$(nproc)" \
        "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" \
        "$(uname -r)" "$(ulimit -n)" "$(cut -d' ' -f1-3 /proc/loadavg)"
}

SERVER_PID=
UPSTREAM_PID=

# stop_server: stops the server started last (nginx's graceful stop is
# SIGQUIT; pushgate and Pushpin's runner take SIGTERM, and the runner stops
# its children), and the test upstream if one was started for it.
stop_server() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -QUIT "$SERVER_PID" 2>/dev/null || true
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
    if [[ -n ${SERVER_CGROUP:-} ]]; then
        # Empty once the server's processes are gone (nginx's workers last
        # a moment longer than its master).
        for _ in $(seq 50); do rmdir "$SERVER_CGROUP" 2>/dev/null && break; sleep 0.1; done
        SERVER_CGROUP=
    fi
    if [[ -n $UPSTREAM_PID ]] && kill -0 "$UPSTREAM_PID" 2>/dev/null; then
        kill -TERM "$UPSTREAM_PID" 2>/dev/null || true
        wait "$UPSTREAM_PID" 2>/dev/null || true
    fi
    UPSTREAM_PID=
}
cleanup_servers() { stop_server; }

# confine_server: with SERVER_CPU set (a percentage of one core), moves the
# server's processes (PIDS) into a cgroup of their own with that much CPU,
# in 10 ms periods, so that the server, not the load generator, is what
# runs out: how a server behaves past its own sustainable rate. Needs root
# and the cgroup cpu controller (v1's cpu.cfs_quota_us or v2's cpu.max).
confine_server() {
    [[ -n ${SERVER_CPU:-} ]] || return 0
    [[ $SERVER_CPU =~ ^[0-9]+$ ]] && ((SERVER_CPU > 0)) || die "SERVER_CPU is a percentage of one core: $SERVER_CPU"
    local quota=$((SERVER_CPU * 100)) period=10000 pid
    if [[ -w /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]]; then
        SERVER_CGROUP=/sys/fs/cgroup/cpu/pushgate-bench-$$
        mkdir -p "$SERVER_CGROUP"
        echo "$period" >"$SERVER_CGROUP/cpu.cfs_period_us"
        echo "$quota" >"$SERVER_CGROUP/cpu.cfs_quota_us"
    elif [[ -w /sys/fs/cgroup/cgroup.subtree_control ]] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
        echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
        SERVER_CGROUP=/sys/fs/cgroup/pushgate-bench-$$
        mkdir -p "$SERVER_CGROUP"
        echo "$quota $period" >"$SERVER_CGROUP/cpu.max"
    else
        die "SERVER_CPU needs root and a cgroup cpu controller"
    fi
    for pid in $PIDS; do echo "$pid" >"$SERVER_CGROUP/cgroup.procs"; done
}

# stop_pids PID...: SIGTERM to each (one already gone is no error), then
# waits for each, so that no process outlives the script.
stop_pids() {
    local pid
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

# start_upstream: `pushgate-bench upstream` on a free port; sets UPSTREAM_PID
# and UPSTREAM (host:port).
start_upstream() {
    local out=$WORK/upstream.out
    : >"$out"
    "$BENCH" upstream --listen 127.0.0.1:0 >"$out" 2>&1 &
    UPSTREAM_PID=$!
    local line
    line=$(wait_for "$out" '^listening on ' "$UPSTREAM_PID" "the test upstream")
    UPSTREAM=${line#listening on }
}

# start_floor: `pushgate-bench floor` (the least a server can do to
# broadcast over SSE, on Nchan's wire) on a free port.
start_floor() {
    local out=$WORK/floor.out
    : >"$out"
    "$BENCH" floor --listen 127.0.0.1:0 >"$out" 2>&1 &
    SERVER_PID=$!
    local line
    line=$(wait_for "$out" '^listening on ' "$SERVER_PID" "the floor server")
    PUBLIC=${line#listening on }
    API=$PUBLIC
    PIDS=$SERVER_PID
}

# build_release: builds pushgate and pushgate-bench (release) and sets
# PUSHGATE and BENCH to them (in CARGO_TARGET_DIR when it is set).
build_release() {
    log "building pushgate and pushgate-bench (release)"
    cargo build --release --quiet -p pushgate -p pushgate-bench
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    PUSHGATE=$target/release/pushgate
    BENCH=$target/release/pushgate-bench
}

# start_pushgate CONFIG [NAME]: pushgate with that config; its listeners on
# port 0, read back from the "listening" line of its log, WORK/NAME.log
# (default pushgate: give each of two pushgates running at once its own).
# RUN_UNDER, when set, is a command line pushgate runs under (valgrind's,
# say); SERVER_PID is then that command's.
start_pushgate() {
    local log=$WORK/${2:-pushgate}.log
    local -a under
    read -r -a under <<<"${RUN_UNDER:-}"
    # Emptied first: the wait below must not read an earlier run's line.
    : >"$log"
    PUSHGATE_LOG__FORMAT=json "${under[@]}" "$PUSHGATE" --config "$1" 2>"$log" >&2 &
    SERVER_PID=$!
    local line
    line=$(wait_for "$log" '"message":"listening"' "$SERVER_PID" "${2:-pushgate}")
    PUBLIC=$(sed -E 's/.*"addr":"([^"]+)".*/\1/' <<<"$line")
    API=$(sed -E 's/.*"api_addr":"([^"]+)".*/\1/' <<<"$line")
    PIDS=$SERVER_PID
    [[ $PUBLIC =~ ^127\.0\.0\.1:[0-9]+$ && $API =~ ^127\.0\.0\.1:[0-9]+$ ]] ||
        die "no addresses in pushgate's line: $line"
}

# start_nchan [CONFIG [UPSTREAM]]: nginx with CONFIG (default
# bench/nchan.conf) on a free port (publish and subscribe on the same
# listener), @UPSTREAM@ in it replaced with UPSTREAM (host:port, the test
# upstream the caller started); PIDS are the master and its workers.
start_nchan() {
    local port dir=$WORK/nchan conf=${1:-$ROOT/bench/nchan.conf} upstream=${2:-}
    port=$(free_port)
    rm -rf "$dir" && mkdir -p "$dir"
    sed "s|@DIR@|$dir|g; s|@LISTEN@|127.0.0.1:$port|; s|@UPSTREAM@|$upstream|" "$conf" >"$dir/nchan.conf"
    ! grep -q '@UPSTREAM@' "$conf" || [[ -n $upstream ]] || die "$conf needs an upstream"
    nginx -p "$dir" -c "$dir/nchan.conf" >"$dir/out.log" 2>&1 &
    SERVER_PID=$!
    wait_http "nginx (Nchan)" "$SERVER_PID" "http://127.0.0.1:$port/pub/probe"
    PUBLIC=127.0.0.1:$port
    API=$PUBLIC
    PIDS="$SERVER_PID $(pgrep -P "$SERVER_PID" | tr '\n' ' ')"
}

# start_pushpin [UPSTREAM]: Pushpin from bench/pushpin/pushpin.conf in the
# foreground with its own rundir, logdir, ipc names and free ports (client
# port, publish port, ZeroMQ ports), routing everything to the test upstream
# at UPSTREAM (host:port), or to a fresh one started here (and stopped by
# stop_server) when none is given. API is Pushpin's publish endpoint. PIDS
# are the runner and its children (condure, zurl, pushpin-proxy,
# pushpin-handler); the upstream is not counted.
start_pushpin() {
    local dir=$WORK/pushpin http publish push_in push_in_sub command
    rm -rf "$dir" && mkdir -p "$dir/run" "$dir/log"
    if [[ -n ${1:-} ]]; then UPSTREAM=$1; else start_upstream; fi
    { read -r http && read -r publish && read -r push_in && read -r push_in_sub && read -r command; } < <(free_ports 5)
    sed "s|@DIR@|$dir|g; s|@HTTP_PORT@|$http|; s|@PUBLISH_PORT@|$publish|;
         s|@PUSH_IN_PORT@|$push_in|; s|@PUSH_IN_SUB_PORT@|$push_in_sub|;
         s|@COMMAND_PORT@|$command|" "$ROOT/bench/pushpin/pushpin.conf" >"$dir/pushpin.conf"
    sed "s|@UPSTREAM_PORT@|${UPSTREAM##*:}|" "$ROOT/bench/pushpin/routes" >"$dir/routes"
    pushpin --config "$dir/pushpin.conf" >"$dir/out.log" 2>&1 &
    SERVER_PID=$!
    wait_http "Pushpin" "$SERVER_PID" "http://127.0.0.1:$http/"
    # Passing a request through does not need the handler; a GRIP hold does,
    # and is answered 500 until the proxy and the handler are connected.
    local code=
    for _ in $(seq 100); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 0.3 \
            "http://127.0.0.1:$http/grip/sse?channel=probe" || true)
        [[ $code == 200 ]] && break
        sleep 0.1
    done
    [[ $code == 200 ]] || die "Pushpin did not hold a stream (answered $code)"
    wait_http "Pushpin's publish endpoint" "$SERVER_PID" -H 'Content-Type: application/json' \
        -d '{"items":[{"channel":"probe","formats":{"http-stream":{"content":"x"}}}]}' "http://127.0.0.1:$publish/publish/"
    PUBLIC=127.0.0.1:$http
    API=127.0.0.1:$publish
    PIDS="$SERVER_PID $(pgrep -P "$SERVER_PID" | tr '\n' ' ')"
}

# versions: the commit of pushgate under test and the peers' versions, for
# the head of a report (TARGETS names the peers run).
versions() {
    local commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git status --porcelain -- src Cargo.toml 2>/dev/null) ]]; then
        commit="$commit (with uncommitted changes in src/)"
    fi
    printf 'pushgate: %s (%s)\n' "$commit" "$PUSHGATE"
    case " $TARGETS " in *" baseline "*) printf 'baseline: %s\n' "$BASELINE" ;; esac
    case " $TARGETS " in *" nchan "*) printf 'nchan:    %s, %s\n' "$(nginx -v 2>&1)" \
        "libnginx-mod-nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null)" ;; esac
    case " $TARGETS " in *" pushpin "*) printf 'pushpin:  %s\n' "$(pushpin --version 2>&1)" ;; esac
}

HZ=$(getconf CLK_TCK)

# ticks PID...: the user + system CPU ticks of these processes so far.
ticks() {
    local pid total=0
    for pid in "$@"; do
        [[ -r /proc/$pid/stat ]] && total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    echo "$total"
}

# child_ticks: sets CHILD_TICKS to the user + system ticks of this shell's
# finished children (the load generator, wrk). `times` must run in this
# shell, not in a $(...) subshell, whose children's times start at zero.
child_ticks() {
    times >"$WORK/times"
    CHILD_TICKS=$(awk -v hz="$HZ" 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
        printf "%d", t * hz
    }' "$WORK/times")
}

# install_missing PACKAGE...: installs these Debian packages with apt-get
# (through sudo unless root); nothing when none is named.
install_missing() {
    (($#)) || return 0
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    log "installing $* with apt-get"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# need_targets: checks that TARGETS names only pushgate, baseline, floor, nchan
# and pushpin,
# and installs the peers' packages when missing.
need_targets() {
    local target missing=()
    for target in $TARGETS; do
        case $target in
        pushgate) ;;
        baseline) [[ -x ${BASELINE:-} ]] || die "target baseline needs BASELINE=<a pushgate binary>" ;;
        floor) ;;
        nchan) [[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ]] || missing+=(nginx libnginx-mod-nchan) ;;
        pushpin) command -v pushpin >/dev/null || missing+=(pushpin) ;;
        *) die "unknown target $target (pushgate, baseline, floor, nchan, pushpin)" ;;
        esac
    done
    install_missing "${missing[@]}"
}
