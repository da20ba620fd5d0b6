#!/usr/bin/env bash
# A profile-guided release build of pushgate: build it instrumented, run it
# through what it spends its time on (pass-through, authenticated connects,
# fan-out over WebSocket, compressed or not, SSE and long-poll), and build it
# again with the profile, so the compiler lays out and inlines the hot paths for how they
# are used. What it buys is measured in docs/benchmarks.md (scenario e) and
# docs/perf-log/2026-12-04-profile-guided-build.md.
#
#   bench/pgo.sh              # the binary: target/pgo/release/pushgate
#   bench/pgo.sh train        # only the training run, against PUSHGATE and
#                             # BENCH as they are (CI checks the workload so)
#
# Knobs (environment):
#   REQUESTS     proxied requests in training        (default 20000)
#   CONNECTS     authenticated connects per transport (default 2000)
#   SUBSCRIBERS  fan-out subscribers per transport   (default 2000)
#   PUSHGATE, BENCH  for `train`: the binaries (default: target/release's)
#
# Needs curl, and rustup's llvm-tools component (added when missing) for an
# llvm-profdata that matches rustc's LLVM. The two builds use their own
# target folders (target/pgo-generate, target/pgo), so target/release and
# its cache stay as they were. About twice a release build's time.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SCRIPT=pgo.sh
. "$ROOT/bench/lib.sh"

REQUESTS=${REQUESTS:-20000}
CONNECTS=${CONNECTS:-2000}
SUBSCRIBERS=${SUBSCRIBERS:-2000}

command -v curl >/dev/null || die "curl is needed (apt-get install curl)"

# train: the workload, against $PUSHGATE behind `$BENCH upstream`. Fails
# when any part of it did not do what it should, so that a training run
# that trained nothing is never taken for one.
train() {
    local key
    key=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    WORK=$(mktemp -d -t pushgate-pgo.XXXXXX)
    trap 'cleanup_servers; rm -rf "$WORK"' EXIT
    start_upstream

    # The app asked about every connect, and everything else passed to it.
    cat >"$WORK/ask.yaml" <<YAML
listen: 127.0.0.1:0
upstream:
  url: http://$UPSTREAM
api:
  listen: 127.0.0.1:0
  keys: ["$key"]
auth:
  mode: upstream
  upstream:
    path: /realtime/auth
    cache_ttl: 0s
realtime:
  max_connections_per_ip: 100000
  connects_per_second: 1000000
  connect_burst: 1000000
limits:
  connections_per_user: 0
log:
  level: info
YAML
    start_pushgate "$WORK/ask.yaml" ask
    log "training: $REQUESTS proxied requests"
    # curl's URL ranges: one process, keep-alive connections, 8 at a time,
    # with the fields a browser sends; a tenth of them POSTs with a body.
    local fields=(-s -o /dev/null -w '%{http_code}\n'
        -H 'User-Agent: Mozilla/5.0 (X11; Linux x86_64) pushgate-pgo'
        -H 'Accept: text/html,application/xhtml+xml,*/*;q=0.8'
        -H 'Accept-Language: en-GB,en;q=0.9' -H 'Cookie: session=u1; theme=dark')
    local codes
    codes=$(curl --no-progress-meter --parallel --parallel-max 8 \
        "${fields[@]}" "http://$PUBLIC/bench?n=[1-$((REQUESTS - REQUESTS / 10))]" --next \
        "${fields[@]}" -d '{"order":42,"items":["a","b"]}' "http://$PUBLIC/orders?n=[1-$((REQUESTS / 10))]" |
        sort | uniq -c)
    [[ $codes =~ ^[[:space:]]*$REQUESTS\ 200$ ]] || die "proxied requests answered otherwise than 200: $codes"
    local transport out
    for transport in ws sse; do
        log "training: $CONNECTS $transport connects that ask the app"
        out=$("$BENCH" connect --target pushgate --public "$PUBLIC" --transport "$transport" \
            --connections "$CONNECTS" --concurrency 50 --distinct-users --header false) ||
            die "the $transport connects failed: $out"
        grep -q "\"ok\":$CONNECTS," <<<"$out" || die "not every $transport connect was accepted: $out"
    done
    stop_server

    # Fan-out, authorised by the listener being on loopback.
    sed 's/^  mode: upstream$/  mode: none/' "$WORK/ask.yaml" >"$WORK/fanout.yaml"
    start_upstream
    start_pushgate "$WORK/fanout.yaml" fanout
    for transport in ws sse poll; do
        log "training: $transport fan-out to $SUBSCRIBERS subscribers"
        out=$("$BENCH" broadcast --target pushgate --public "$PUBLIC" --api "$API" --key "$key" \
            --transport "$transport" --subscribers "$SUBSCRIBERS" --channel "train-$transport" \
            --rate 20 --duration 3 --connect-rate 2000 --header false) ||
            die "the $transport fan-out failed: $out"
        grep -q '"delivery_ratio":1.0,' <<<"$out" && grep -q '"gaps":0,' <<<"$out" ||
            die "the $transport fan-out lost messages: $out"
    done
    # WebSocket compression: subscribers that negotiate permessage-deflate,
    # publications large enough to be compressed.
    log "training: compressed ws fan-out to $SUBSCRIBERS subscribers"
    out=$("$BENCH" broadcast --target pushgate --public "$PUBLIC" --api "$API" --key "$key" \
        --transport ws --deflate --payload-size 1024 --subscribers "$SUBSCRIBERS" \
        --channel train-deflate --rate 20 --duration 3 --connect-rate 2000 --header false) ||
        die "the compressed fan-out failed: $out"
    grep -q '"delivery_ratio":1.0,' <<<"$out" && grep -q '"gaps":0,' <<<"$out" ||
        die "the compressed fan-out lost messages: $out"
    # SIGTERM: pushgate drains and exits, and the instrumented binary
    # writes its counts on the way out.
    stop_server
    trap - EXIT
    rm -rf "$WORK"
}

if [[ ${1:-} == train ]]; then
    PUSHGATE=${PUSHGATE:-$ROOT/target/release/pushgate}
    BENCH=${BENCH:-$ROOT/target/release/pushgate-bench}
    train
    log "training done"
    exit 0
fi
[[ $# == 0 ]] || die "usage: bench/pgo.sh [train]"

host=$(rustc -vV | sed -n 's/^host: //p')
profdata=$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata
[[ -x $profdata ]] || rustup component add llvm-tools
[[ -x $profdata ]] || die "no llvm-profdata at $profdata"

DATA=$ROOT/target/pgo-data
rm -rf "$DATA"

log "building pushgate-bench, and pushgate instrumented"
cargo build --release --locked --quiet -p pushgate-bench
BENCH=$ROOT/target/release/pushgate-bench
RUSTFLAGS="-Cprofile-generate=$DATA" CARGO_TARGET_DIR=$ROOT/target/pgo-generate \
    cargo build --release --locked --quiet -p pushgate --bin pushgate
PUSHGATE=$ROOT/target/pgo-generate/release/pushgate
# Build scripts and proc macros ran instrumented too: their counts go.
rm -rf "$DATA"

train
shopt -s nullglob
raw=("$DATA"/*.profraw)
((${#raw[@]})) || die "the instrumented pushgate wrote no profile into $DATA"
"$profdata" merge -o "$DATA/pushgate.profdata" "${raw[@]}"

log "building pushgate with the profile"
RUSTFLAGS="-Cprofile-use=$DATA/pushgate.profdata" CARGO_TARGET_DIR=$ROOT/target/pgo \
    cargo build --release --locked --quiet -p pushgate --bin pushgate
log "built $ROOT/target/pgo/release/pushgate"
