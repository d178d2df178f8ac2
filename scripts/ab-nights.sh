#!/usr/bin/env bash
# Compares the incremental night of two lambda-batch binaries, interleaved (this machine's speed
# drifts by 10-15%: only runs side by side compare). Each binary first makes its own full run's
# stores (cutoff 2025-12-31); every night (cutoff 2026-01-01) starts from a fresh copy of them.
# Usage: scripts/ab-nights.sh BIN_A BIN_B [NIGHTS=8] [DATA_DIR=data/gen10m]
#   e.g. cp "$CARGO_TARGET_DIR/release/lambda-batch" /tmp/before; (change, rebuild)
#        scripts/ab-nights.sh /tmp/before "$CARGO_TARGET_DIR/release/lambda-batch"
# Prints per binary: mean wall and CPU (user + sys) seconds, mean peak RSS, and every wall time.
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
done | awk -v a="$1" -v b="$2" '
  { w[$1] += $2; c[$1] += $3 + $4; m[$1] += $5; n[$1]++; all[$1] = all[$1] " " $2 }
  END { name[0] = a; name[1] = b
        for (k = 0; k <= 1; k++)
          printf "%s: night %.3f s wall, %.3f s CPU, %.0f MB peak RSS  [%s ]\n",
            name[k], w[k] / n[k], c[k] / n[k], m[k] / n[k] / 1024, all[k] }'
