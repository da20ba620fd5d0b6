#!/usr/bin/env bash
# The standing adversarial suite at full size: the same tests `cargo test`
# runs, with PUSHGATE_SUITE_SIZE=full, which scales them from what fits CI
# to thousands of slow clients, floods of tens of thousands of requests,
# and longer chaos runs (docs/security.md).
#
#   integration/adversarial.sh            every adversarial test file
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
args=()
for file in "${files[@]}"; do
    args+=(--test "$file")
done
PUSHGATE_SUITE_SIZE=full cargo test "${args[@]}" -- --test-threads=1
