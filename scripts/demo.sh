#!/usr/bin/env bash
# The README's first command: fill a demo table's embedding column, locally,
# with no API key and no network.
#
# It makes the local PostgreSQL ready (pgvector), builds autoembed, loads 300
# sample products from examples/products.csv into autoembed_demo.products,
# and runs `autoembed verify`, `dry-run` and `backfill` against a stand-in
# embeddings server on 127.0.0.1 (examples/mock_server.rs: OpenAI's wire
# format, vectors derived from the text, not meaningful ones). To use a real
# provider instead, see README.md, "Point it at your provider".
#
# Environment: PGHOST, PGPORT, PGUSER, PGDATABASE as for scripts/dev-db.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}" PGDATABASE="${PGDATABASE:-test}"
export PGOPTIONS="${PGOPTIONS:--c client_min_messages=warning}"
bash scripts/dev-db.sh
cargo build --locked --quiet --bin autoembed --example mock_server
bin=target/debug/autoembed

psql -Xq -v ON_ERROR_STOP=1 <<'SQL'
DROP SCHEMA IF EXISTS autoembed_demo CASCADE;
CREATE SCHEMA autoembed_demo;
CREATE TABLE autoembed_demo.products (
    product_id_internal bigint PRIMARY KEY,
    name                text NOT NULL,
    embedding_text      text,
    embedding           vector(1536)
);
\copy autoembed_demo.products (product_id_internal, name, embedding_text) FROM 'examples/products.csv' WITH (FORMAT csv, HEADER true)
SQL

# The stand-in provider, on a free loopback port; stopped when this script ends.
out=$(mktemp)
target/debug/examples/mock_server 0 1536 >"$out" &
mock_pid=$!
trap 'kill $mock_pid 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 1 100); do [ -s "$out" ] && break; sleep 0.1; done
api_base=$(head -1 "$out")

export DATABASE_URL="postgresql://$PGUSER@$PGHOST:$PGPORT/$PGDATABASE"
export AUTOEMBED_TABLE=autoembed_demo.products AUTOEMBED_STATE_SCHEMA=autoembed_demo_state
export AUTOEMBED_PROVIDER=openai-compatible AUTOEMBED_API_BASE="$api_base"

echo "== autoembed verify"
"$bin" verify || true
echo "== autoembed dry-run"
"$bin" dry-run
echo "== autoembed backfill"
"$bin" backfill --batch-size 50
echo "== autoembed run-once (nothing left to do)"
"$bin" run-once
echo "== the table"
psql -Xc "SELECT count(*) AS rows, count(embedding) AS embedded, max(vector_dims(embedding)) AS dimensions FROM autoembed_demo.products"
