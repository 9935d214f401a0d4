#!/usr/bin/env bash
# The test command: make the local database ready for the tests
# (scripts/test-db.sh) and fetch the local model (the tests embed with it),
# then run every check CI runs.
#
#   scripts/test.sh            # fmt, clippy, all tests
#   scripts/test.sh NAME       # only tests whose name contains NAME
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-db.sh
bash scripts/fetch-model.sh
if [ "$#" -eq 0 ]; then
  cargo fmt --all -- --check
  cargo clippy --all-targets --locked -- -D warnings
  # The lean API-only build (no local model) must stay warning-free too.
  cargo clippy --all-targets --locked --no-default-features -- -D warnings
fi
cargo test --locked --all-targets "$@"
