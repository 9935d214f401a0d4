#!/usr/bin/env bash
# The test command: make the local database ready, then run every check CI runs.
#
#   scripts/test.sh            # fmt, clippy, all tests
#   scripts/test.sh NAME       # only tests whose name contains NAME
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/dev-db.sh
if [ "$#" -eq 0 ]; then
  cargo fmt --all -- --check
  cargo clippy --all-targets --locked -- -D warnings
fi
cargo test --locked --all-targets "$@"
