#!/usr/bin/env bash
# make demo: runs what exists of the pipeline end to end on the embedded default (local files only).
# Each layer that lands extends this script.
set -euo pipefail
dir=${1:-data/demo}
events=${2:-2000000}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
: "${CARGO_TARGET_DIR:=$HOME/.cache/lambda-target}"
export CARGO_TARGET_DIR
bin="$CARGO_TARGET_DIR/release"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building release binaries (the first build takes several minutes)"
cargo build --release --locked -p lambda-gen -p lambda-batch -p lambda-speed -p lambda-serving -p lambda-parity

step "1. The feature definition (one file per view; both paths derive from it)"
"$bin/lambda-batch" check --view examples/fraud/features.toml
"$bin/lambda-batch" check --view examples/fraud/product_views.toml

step "2. Generating $events events (90 days) into $dir"
"$bin/lambda-gen" --events "$events" --days 90 --out "$dir"
echo "history partitions:"; ls "$dir/history" | head -3; echo "  … $(ls "$dir/history" | wc -l) days"
echo "first stream lines:"; head -n 2 "$dir/stream/events.jsonl"

step "3. The batch SQL generated from the definition (as of the end of the data)"
"$bin/lambda-batch" sql --view examples/fraud/features.toml --as-of 2026-01-01T00:00:00Z > "$dir/fraud_user.sql"
head -n 8 "$dir/fraud_user.sql"
echo "  … ($(wc -l < "$dir/fraud_user.sql") lines in $dir/fraud_user.sql)"

step "4. The nightly batch job up to 2025-12-31 (embedded default: local Parquet in, redb online store out)"
rm -rf "$dir/offline" "$dir/online.redb" "$dir/online.redb.values"
"$bin/lambda-batch" run --view examples/fraud/features.toml --history "$dir/history" \
  --offline "$dir/offline" --store "$dir/online.redb" --cutoff 2025-12-31 --row-ttl-days 3650
echo "offline store:"; find "$dir/offline" -name '*.parquet' | sed 's|/part-0.parquet||' | sort | tail -3

step "5. The next night (2026-01-01): only the new day is read, only entities with events that day are rewritten"
"$bin/lambda-batch" run --view examples/fraud/features.toml --history "$dir/history" \
  --offline "$dir/offline" --store "$dir/online.redb" --cutoff 2026-01-01 --row-ttl-days 3650

step "6. The batch view of a few users (features at the cutoff, from their batch rows)"
"$bin/lambda-batch" show --view examples/fraud/features.toml --store "$dir/online.redb" \
  --entity u0000000 --entity u0000001

step "7. The schedules (cron, UTC): what would run"
"$bin/lambda-batch" schedule --dry-run --state "$dir/scheduler"

step "8. The speed layer: the stream's last 25 000 records through lambda-speed (tiles in the same store)"
tail -n 25000 "$dir/stream/events.jsonl" > "$dir/stream/recent.jsonl"
rm -rf "$dir/dead-letter"
"$bin/lambda-speed" run --view examples/fraud/features.toml --source "$dir/stream/recent.jsonl" \
  --store "$dir/online.redb" --dead-letter-dir "$dir/dead-letter" --late-dir "$dir/history" \
  --tile-ttl 3650d --exit-at-end 2>&1 | grep -v INFO || true
echo "dead letters (malformed records, with the reason):"; head -c 300 "$dir"/dead-letter/*.jsonl 2>/dev/null; echo
echo "late events, written into the history for the batch layer:"; ls "$dir"/history/*/late-* 2>/dev/null | head -3 || true

step "9. Live tiles of a few users (5-minute tiles, fresh about a second after an event is read)"
"$bin/lambda-speed" show --view examples/fraud/features.toml --store "$dir/online.redb" \
  --entity u0000000 --entity u0000001 --last 3

step "10. What is not built yet"
for b in lambda-serve lambda-parity; do
  "$bin/$b" >/dev/null 2>&1 && echo "$b: unexpectedly succeeded" || echo "$b: not built yet (exits non-zero, as it should)"
done

step "Done. Data in $dir; rerun with DEMO_EVENTS=10000000 for the full-size data set."
