#!/usr/bin/env bash
# The benchmark (examples/bench/): autoembed's backfill rate next to the
# database's own ceiling and the reference cron script, a cron tick on a
# 1,000,000-row table, and peak memory. Prints a Markdown report on stdout.
#
#   scripts/bench.sh                       # everything (the 1M-row table takes a few minutes, once)
#   scripts/bench.sh --skip tick,memory    # arguments go to examples/bench/
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-db.sh
if [ ! -x /usr/bin/time ]; then
  apt-get update -qq && apt-get install -y -qq time >/dev/null
fi
venv=target/bench-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openai psycopg2-binary
fi
cargo build --locked --release --quiet --bin autoembed --example bench
target/release/examples/bench --python "$venv/bin/python" "$@"
