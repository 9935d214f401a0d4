#!/usr/bin/env bash
# What `autoembed watch` gives and costs:
# - the time from a row's commit to its vector, for an application inserting
#   10 rows a second (each its own transaction) for 30 s, the mock provider
#   answering in 200 ms; with `setup --notify` and with polling alone
#   (--poll-interval 1); then the idle cost (transactions a minute);
# - what the notify trigger costs the application: INSERTs a second of 8
#   concurrent writers (pgbench, 15 s) with setup's trigger alone and with
#   --notify;
# - a burst of 10,000 rows in one transaction: the time until watch has
#   embedded them, against backfill on the same rows (mock at 200 ms);
# - peak RSS of a watcher after 10,000 rows and after 1,000,000 (mock at 0 ms).
# Needs the release build and the mock server:
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
fast=$(mktemp)
target/release/examples/mock_server 0 384 0 > "$fast" & FAST=$!
WATCH=
trap 'kill $MOCK $FAST $WATCH 2>/dev/null; rm -f "$url" "$fast"' EXIT
for _ in $(seq 50); do [ -s "$url" ] && [ -s "$fast" ] && break; sleep 0.1; done
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

# What the notify trigger costs 8 concurrent writers.
insert_sql=$(mktemp --suffix=.sql)
echo "INSERT INTO b_watch.products (embedding_text) VALUES ('a row from pgbench');" > "$insert_sql"
for flags in "" "--notify"; do
  fresh
  $BIN setup $flags > /dev/null 2>&1
  tps=$(pgbench -h 127.0.0.1 -U postgres -n -c 8 -j 2 -T 15 -f "$insert_sql" test 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  echo "8 writers, setup ${flags:-without --notify}: $tps INSERTs a second"
done
rm -f "$insert_sql"

# A burst of 10,000 rows in one transaction: watch against backfill.
burst() { $PSQL -c "INSERT INTO b_watch.products (embedding_text) SELECT 'burst row ' || g FROM generate_series(1, 10000) g"; }
fresh; $BIN setup --notify > /dev/null 2>&1
$BIN watch --poll-interval 1 > /dev/null 2>&1 & WATCH=$!
sleep 2
s=$(date +%s%N); burst
until [ "$($PSQL -tAc "SELECT count(*) FROM b_watch.products WHERE embedding IS NULL")" = 0 ]; do sleep 0.05; done
e=$(date +%s%N); kill -TERM $WATCH; wait $WATCH 2>/dev/null || true; WATCH=
echo "burst of 10000 rows: watch drained it in $(( (e - s) / 1000000 )) ms (from the insert's start)"
fresh; burst
s=$(date +%s%N); $BIN backfill > /dev/null 2>&1; e=$(date +%s%N)
echo "burst of 10000 rows: backfill took $(( (e - s) / 1000000 )) ms"

# Peak RSS of a watcher: 10,000 rows, then 1,000,000.
export AUTOEMBED_API_BASE=$(cat "$fast")
for n in 10000 1000000; do
  fresh; $BIN setup > /dev/null 2>&1
  $PSQL -c "INSERT INTO b_watch.products (embedding_text) SELECT 'row ' || g || ' of a long run' FROM generate_series(1, $n) g"
  $BIN watch --poll-interval 1 > /dev/null 2>&1 & WATCH=$!
  until [ "$($PSQL -tAc "SELECT count(*) FROM b_watch.products WHERE embedding IS NULL")" = 0 ]; do sleep 0.5; done
  echo "watch after $n rows: peak RSS $(awk '/VmHWM/ {print $2, $3}' /proc/$WATCH/status)"
  if [ "$n" = 1000000 ]; then
    # Idle on the million rows: the database CPU of the watcher's backends over 30 s.
    pids=$($PSQL -tAc "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE application_name = 'autoembed'")
    ticks() { local t=0; for p in $pids; do [ -r /proc/$p/stat ] && t=$(( t + $(awk '{print $14 + $15}' /proc/$p/stat) )); done; echo $t; }
    before=$(ticks); sleep 30; after=$(ticks)
    echo "idle on 1000000 rows: the watcher's backends used $(( (after - before) * 1000 / $(getconf CLK_TCK) / 30 )) ms of CPU a second"
  fi
  kill -TERM $WATCH; wait $WATCH 2>/dev/null || true; WATCH=
done
$PSQL -c "DROP SCHEMA b_watch CASCADE; DROP SCHEMA b_watch_state CASCADE"
