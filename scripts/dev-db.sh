#!/usr/bin/env bash
# Make the local PostgreSQL ready for autoembed: pgvector, and nothing else.
#
# Idempotent. On a machine where the pgvector extension is missing it builds it
# from Debian's source package (bookworm has no binary package for it) against
# postgresql-server-dev-<major>, then creates the extension in the target
# database. It changes nothing else on the server: what only the tests need
# (TLS, a password role, pgbouncer, logical replication) is scripts/test-db.sh.
#
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres), PGDATABASE (test).
set -euo pipefail

name=dev-db
source "$(dirname "$0")/db-env.sh"

# 1. PostgreSQL must answer.
if ! pg_isready -q; then
  log "PostgreSQL is not answering on $PGHOST:$PGPORT; trying to start it"
  if command -v pg_ctlcluster >/dev/null; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q && break; sleep 1; done
  pg_isready -q || { log "PostgreSQL is still not reachable on $PGHOST:$PGPORT"; exit 1; }
fi
major=$(psql -XtAc "show server_version_num" | cut -c1-2)

# 2. pgvector, built from Debian's source package when missing.
have_vector() { [ "$(psql -XtAc "select count(*) from pg_available_extensions where name = 'vector'")" = 1 ]; }
if ! have_vector; then
  log "pgvector is missing; building it from Debian's source package for PostgreSQL $major"
  src_list=/etc/apt/sources.list.d/autoembed-pgvector-src.list
  if [ ! -f "$src_list" ]; then
    echo "deb-src http://deb.debian.org/debian trixie main" | as_root tee "$src_list" >/dev/null
  fi
  apt_install "postgresql-server-dev-$major" build-essential dpkg-dev
  build=$(mktemp -d)
  (cd "$build" && apt-get source -qq pgvector >/dev/null 2>&1 && cd pgvector-*/ \
     && make -s PG_CONFIG="/usr/lib/postgresql/$major/bin/pg_config" >/dev/null \
     && as_root make -s install PG_CONFIG="/usr/lib/postgresql/$major/bin/pg_config" >/dev/null)
  rm -rf "$build"
  have_vector || { log "pgvector build failed"; exit 1; }
fi
psql -Xq -v ON_ERROR_STOP=1 -c "create extension if not exists vector" >/dev/null
log "pgvector $(psql -XtAc "select extversion from pg_extension where extname = 'vector'") ready in database $PGDATABASE"
