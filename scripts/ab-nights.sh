#!/usr/bin/env bash
# Compares the incremental night of two lambda-batch binaries, interleaved (this machine's speed
# drifts by 10-15%: only runs side by side compare). Each binary first makes its own full run's
# stores (cutoff 2025-12-31); every night (cutoff 2026-01-01) starts from a fresh copy of them.
# Usage: scripts/ab-nights.sh BIN_A BIN_B [NIGHTS=8] [DATA_DIR=data/gen10m]
#   e.g. cp "$CARGO_TARGET_DIR/release/lambda-batch" /tmp/before; (change, rebuild)
#        scripts/ab-nights.sh /tmp/before "$CARGO_TARGET_DIR/release/lambda-batch"
# Prints per binary: mean and median wall, mean CPU (user + sys) seconds, mean peak RSS, and every
# wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,8p "$0"; exit 2; }
bins=("$1" "$2"); nights=${3:-8}; data=${4:-data/gen10m}
[ -d "$data/history" ] || { echo "no history in $data: run scripts/bench-batch.sh first (it generates it)" >&2; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
run() { # BIN DIR [ARGS...]
  local bin=$1 dir=$2; shift 2
  "$bin" run --view examples/fraud/features.toml --history "$data/history" --offline "$dir/offline" \
    --store "$dir/online.redb" --row-ttl-days 3650 "$@" >/dev/null 2>&1
}
for k in 0 1; do
  d="$work/$k"; mkdir -p "$d/full"
  run "${bins[$k]}" "$d/full" --full --cutoff 2025-12-31
done
for i in $(seq "$nights"); do
  for k in 0 1; do
    d="$work/$k"; rm -rf "$d/night"; cp -r "$d/full" "$d/night"; sync
    /usr/bin/time -o "$work/t" -f "%e %U %S %M" \
      "${bins[$k]}" run --view examples/fraud/features.toml --history "$data/history" \
      --offline "$d/night/offline" --store "$d/night/online.redb" --row-ttl-days 3650 \
      --cutoff 2026-01-01 >/dev/null 2>&1
    echo "$k $(cat "$work/t")"
  done
done | python3 -c '
import statistics, sys
names, runs = sys.argv[1:3], {0: [], 1: []}
for line in sys.stdin:
    k, wall, user, sys_, rss = line.split()
    runs[int(k)].append((float(wall), float(user) + float(sys_), int(rss)))
for k in (0, 1):
    r = runs[k]
    walls = [x[0] for x in r]
    # The median too: a shared machine adds a slow outlier now and then.
    print(f"{names[k]}: night {statistics.mean(walls):.3f} s wall (median {statistics.median(walls):.3f}), "
          f"{statistics.mean(x[1] for x in r):.3f} s CPU, {statistics.mean(x[2] for x in r) / 1024:.0f} MB peak RSS  "
          "[ " + " ".join("%.2f" % w for w in walls) + " ]")
' "$1" "$2"
