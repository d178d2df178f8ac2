#!/usr/bin/env bash
# Speed-layer benchmarks.
#   1. One core: decode + dedup + tiling + state update (criterion, no I/O).
#   2. End to end against the local emulators: kinesis-mock -> lambda-speed -> DynamoDB Local,
#      records/s and freshness p50/p99 (read -> tile acknowledged), draining a backlog and live.
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
echo "-- backlog: fill the stream, then drain it"
cargo run --release --locked -q -p lambda-speed --example e2e -- "${1:-50000}" "${2:-4}"
echo "-- live: the consumer follows while a producer puts 1000 records/s"
cargo run --release --locked -q -p lambda-speed --example e2e -- 20000 "${2:-4}" live 1000
