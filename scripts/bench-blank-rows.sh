#!/usr/bin/env bash
# What blank rows cost a cron tick: run-once (median of 9 ticks) on 100,000
# blank rows and 10 pending, with setup's index and with the index earlier
# versions built (WHERE embedding IS NULL, blank rows included), against 10
# pending rows alone. Needs the release build and the mock server:
#   cargo build --release --bin autoembed --example mock_server
#   scripts/bench-blank-rows.sh
# Uses schemas b_blank and b_alone in the local database `test`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/autoembed
export PGOPTIONS="-c client_min_messages=warning"
PSQL="psql -X -q -h 127.0.0.1 -d test -v ON_ERROR_STOP=1"
url=$(mktemp)
target/release/examples/mock_server 0 1536 > "$url" & MOCK=$!
trap 'kill $MOCK; rm -f "$url"' EXIT
for _ in $(seq 50); do [ -s "$url" ] && break; sleep 0.1; done
BASE=$(cat "$url")
run() { env -i PATH=$PATH DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test AUTOEMBED_TABLE=$1.products \
        AUTOEMBED_STATE_SCHEMA=$1_state AUTOEMBED_PROVIDER=openai AUTOEMBED_API_BASE=$BASE OPENAI_API_KEY=sk-x $BIN "${@:2}"; }
tick() { # median of 9 ticks, ms
  for i in $(seq 9); do
    $PSQL -c "UPDATE $1.products SET embedding = NULL WHERE product_id_internal > 200000"
    s=$(date +%s%N); run $1 run-once > /dev/null; e=$(date +%s%N); echo $(( (e - s) / 1000000 ))
  done | sort -n | sed -n 5p
}
for sc in blank alone; do
  $PSQL -c "DROP SCHEMA IF EXISTS b_$sc CASCADE; DROP SCHEMA IF EXISTS b_${sc}_state CASCADE; CREATE SCHEMA b_$sc;
    CREATE TABLE b_$sc.products (product_id_internal bigint PRIMARY KEY, embedding_text text, embedding vector(1536));"
  [ $sc = blank ] && $PSQL -c "INSERT INTO b_$sc.products SELECT g, CASE WHEN g % 2 = 0 THEN '' ELSE '   ' END FROM generate_series(1, 100000) g"
  $PSQL -c "INSERT INTO b_$sc.products SELECT g, 'product ' || g FROM generate_series(200001, 200010) g" -c "VACUUM ANALYZE b_$sc.products"
  run b_$sc setup > /dev/null 2>&1
  echo "$sc, setup's index: $(tick b_$sc) ms"
  if [ $sc = blank ]; then
    $PSQL -c "DROP INDEX b_$sc.products_autoembed_queue; CREATE INDEX products_autoembed_pending ON b_$sc.products (product_id_internal) WHERE embedding IS NULL; ANALYZE b_$sc.products"
    echo "$sc, the previous index (WHERE embedding IS NULL): $(tick b_$sc) ms"
  fi
  $PSQL -c "DROP SCHEMA b_$sc CASCADE; DROP SCHEMA b_${sc}_state CASCADE"
done
