#!/usr/bin/env bash
# What `autoembed watch` gives: the time from a row's commit to its vector,
# for an application inserting 10 rows a second (each its own transaction)
# for 30 s, the mock provider answering in 200 ms; with `setup --notify` and
# with polling alone (--poll-interval 1). Then the idle cost: transactions a
# minute with nothing to do. Needs the release build and the mock server:
#   cargo build --release --bin autoembed --example mock_server
#   scripts/bench-watch.sh
# Uses schema b_watch in the local database `test`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/autoembed
export PGOPTIONS="-c client_min_messages=warning"
PSQL="psql -X -q -h 127.0.0.1 -d test -v ON_ERROR_STOP=1"
url=$(mktemp)
target/release/examples/mock_server 0 384 200 > "$url" & MOCK=$!
WATCH=
trap 'kill $MOCK $WATCH 2>/dev/null; rm -f "$url"' EXIT
for _ in $(seq 50); do [ -s "$url" ] && break; sleep 0.1; done
export DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test AUTOEMBED_TABLE=b_watch.products \
  AUTOEMBED_STATE_SCHEMA=b_watch_state AUTOEMBED_PROVIDER=openai AUTOEMBED_API_BASE=$(cat "$url") \
  OPENAI_API_KEY=sk-x AUTOEMBED_DIMENSIONS=384
fresh() {
  $PSQL -c "DROP SCHEMA IF EXISTS b_watch CASCADE; DROP SCHEMA IF EXISTS b_watch_state CASCADE; CREATE SCHEMA b_watch;
    CREATE TABLE b_watch.products (product_id_internal bigserial PRIMARY KEY, embedding_text text, embedding vector(384),
      committed_at timestamptz, embedded_at timestamptz);
    -- for the measurement only: when the vector landed
    CREATE FUNCTION b_watch.landed() RETURNS trigger LANGUAGE plpgsql AS \$\$ BEGIN
      IF NEW.embedding IS NOT NULL AND OLD.embedding IS NULL THEN NEW.embedded_at := clock_timestamp(); END IF;
      RETURN NEW; END \$\$;
    CREATE TRIGGER landed BEFORE UPDATE ON b_watch.products FOR EACH ROW EXECUTE FUNCTION b_watch.landed();"
}
measure() { # $1: label, $2...: setup flags
  local label=$1; shift
  fresh
  $BIN setup "$@" > /dev/null 2>&1
  $BIN watch --poll-interval 1 > /dev/null 2>&1 & WATCH=$!
  sleep 2
  for i in $(seq 300); do
    # committed_at: the commit is a few ms after; the figures are upper bounds of that much.
    $PSQL -c "INSERT INTO b_watch.products (embedding_text, committed_at) VALUES ('row $i of a trickle', clock_timestamp())" &
    sleep 0.1
  done
  wait_all=0
  for _ in $(seq 300); do
    [ "$($PSQL -tAc "SELECT count(*) FROM b_watch.products WHERE embedding IS NULL")" = 0 ] && break
    sleep 0.1
  done
  echo "$label: $($PSQL -tAc "SELECT format('p50 %s s, p99 %s s, max %s s (%s rows)',
      round(percentile_cont(0.5) WITHIN GROUP (ORDER BY x)::numeric, 3),
      round(percentile_cont(0.99) WITHIN GROUP (ORDER BY x)::numeric, 3),
      round(max(x)::numeric, 3), count(*))
    FROM (SELECT extract(epoch FROM embedded_at - committed_at) x FROM b_watch.products) s")"
  if [ "$label" = polling ]; then
    before=$($PSQL -tAc "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'test'")
    sleep 30
    after=$($PSQL -tAc "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'test'")
    echo "idle: $(( (after - before) * 2 )) transactions a minute in the database (watch and this script's two queries)"
  fi
  kill -TERM $WATCH; wait $WATCH 2>/dev/null || true; WATCH=
}
measure notify --notify
measure polling
$PSQL -c "DROP SCHEMA b_watch CASCADE; DROP SCHEMA b_watch_state CASCADE"
