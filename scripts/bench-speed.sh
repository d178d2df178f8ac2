#!/usr/bin/env bash
# Speed-layer benchmarks.
#   1. One core: decode + dedup + tiling + state update (criterion, no I/O).
#   2. End to end against the local emulators: kinesis-mock -> lambda-speed -> DynamoDB Local,
#      records/s and freshness p50/p99 (read -> tile acknowledged).
# Usage: scripts/bench-speed.sh [EVENTS] [SHARDS]   (default 50000 4)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/lambda-target}"
export CARGO_TARGET_DIR
echo "== speed path on one core (criterion)"
cargo bench -p lambda-speed --bench tiler 2>&1 | grep -E "speed_path|time:|thrpt:"
echo "== end to end on the local emulators"
trap 'scripts/emulators.sh down >/dev/null' EXIT
eval "$(scripts/emulators.sh up)"
cargo run --release --locked -q -p lambda-speed --example e2e -- "${1:-50000}" "${2:-4}"
