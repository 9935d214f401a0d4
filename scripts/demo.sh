#!/usr/bin/env bash
# The README's first command: fill a demo table with real embeddings, locally,
# with no API key, no network at run time and no cost, then search it.
#
#   scripts/demo.sh ["a search query"]
#
# It makes the local PostgreSQL ready (scripts/dev-db.sh: pgvector), fetches
# the local model (scripts/fetch-model.sh: all-MiniLM-L6-v2, once), builds
# autoembed, loads 300 products from examples/products.csv into
# autoembed_demo.products (vector(384)), runs `autoembed verify` and
# `autoembed backfill --provider local`, embeds the query the same way (a
# one-row table, autoembed_demo.queries) and prints the three products
# nearest to it with pgvector's <=> (cosine distance).
#
# Environment: PGHOST, PGPORT, PGUSER, PGDATABASE as for scripts/dev-db.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
query=${1:-"something to keep me dry on a rainy hike"}
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}" PGDATABASE="${PGDATABASE:-test}"
export PGOPTIONS="${PGOPTIONS:--c client_min_messages=warning}"
bash scripts/dev-db.sh
bash scripts/fetch-model.sh
cargo build --locked --quiet --bin autoembed
bin=target/debug/autoembed

psql -Xq -v ON_ERROR_STOP=1 -v query="$query" <<'SQL'
DROP SCHEMA IF EXISTS autoembed_demo CASCADE;
DROP SCHEMA IF EXISTS autoembed_demo_state CASCADE;
CREATE SCHEMA autoembed_demo;
CREATE TABLE autoembed_demo.products (
    product_id_internal bigint PRIMARY KEY,
    name                text NOT NULL,
    embedding_text      text,
    embedding           vector(384)
);
\copy autoembed_demo.products (product_id_internal, name, embedding_text) FROM 'examples/products.csv' WITH (FORMAT csv, HEADER true)
CREATE TABLE autoembed_demo.queries (
    id             int PRIMARY KEY,
    embedding_text text,
    embedding      vector(384)
);
INSERT INTO autoembed_demo.queries VALUES (1, :'query');
SQL

export DATABASE_URL="postgresql://$PGUSER@$PGHOST:$PGPORT/$PGDATABASE"
export AUTOEMBED_PROVIDER=local AUTOEMBED_STATE_SCHEMA=autoembed_demo_state

echo "== autoembed verify --table autoembed_demo.products"
"$bin" verify --table autoembed_demo.products
echo "== autoembed backfill --table autoembed_demo.products"
"$bin" backfill --table autoembed_demo.products
echo "== autoembed run-once --table autoembed_demo.queries (the query: \"$query\")"
"$bin" run-once --table autoembed_demo.queries
echo "== the three products nearest to \"$query\""
psql -X -v ON_ERROR_STOP=1 -c "
SELECT p.name, round((p.embedding <=> q.embedding)::numeric, 3) AS cosine_distance
FROM autoembed_demo.products p, autoembed_demo.queries q
WHERE q.id = 1
ORDER BY p.embedding <=> q.embedding
LIMIT 3"
