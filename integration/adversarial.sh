#!/usr/bin/env bash
# The standing adversarial suite at full size: the same tests `cargo test`
# runs, with PUSHGATE_SUITE_SIZE=full, which scales them from what fits CI
# to thousands of slow clients, floods of tens of thousands of requests,
# and longer chaos runs (docs/security.md).
#
#   integration/adversarial.sh            every adversarial test module
#   integration/adversarial.sh adversarial   one of them
#
# Needs what `cargo test` needs (redis-server for the Redis runs). The
# open-file limit is raised as far as the hard limit allows.
set -euo pipefail
cd "$(dirname "$0")/.."

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
files=("$@")
if ((${#files[@]} == 0)); then
    files=(adversarial ws_abuse websocket cursors chaos)
fi
# Each file is a module of one of the test binaries (tests/*/main.rs);
# its tests are picked by their module path.
binary_of() {
    case $1 in
    adversarial | proxy | limits | process | demo) echo proxy ;;
    websocket | ws_abuse | sse_poll | presence | cursors | exactness | auth | jwt | jwks) echo realtime ;;
    broker | redis_connect | redis_cluster | redis_cluster_faults | scale_out | chaos) echo engine ;;
    *) echo "$1" ;;
    esac
}
# One run per binary, with the modules wanted of it as filters (none: all).
declare -A wanted=()
order=()
for file in "${files[@]}"; do
    binary=$(binary_of "$file")
    [[ -v "wanted[$binary]" ]] || { wanted[$binary]=""; order+=("$binary"); }
    [[ $binary == "$file" ]] || wanted[$binary]+=" $file::"
done
for binary in "${order[@]}"; do
    # shellcheck disable=SC2086 # the filters are words
    PUSHGATE_SUITE_SIZE=full cargo test --test "$binary" -- --test-threads=1 ${wanted[$binary]}
done
