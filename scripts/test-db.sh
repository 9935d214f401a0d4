#!/usr/bin/env bash
# Make the local PostgreSQL ready for autoembed's tests: what scripts/dev-db.sh
# does (pgvector), and what only the tests need, which the demo leaves alone:
#   - TLS with a throwaway CA, for the sslmode tests (tests/it/tls.rs);
#   - a role that must give a password, for the wrong-password test;
#   - pgbouncer, which the pooler tests start themselves;
#   - wal_level = logical, for the logical replication test (a restart).
#
# Idempotent. Environment: as for scripts/dev-db.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/dev-db.sh

name=test-db
source scripts/db-env.sh

# 1. TLS on the local server with a throwaway CA, for the sslmode tests
#    (tests/it/tls.rs). Only when the server has TLS off or uses Debian's
#    snakeoil certificate: another setup is left alone. Writes
#    $AUTOEMBED_TEST_TLS_DIR (ca.crt, other-ca.crt, server.*).
tls_dir="${AUTOEMBED_TEST_TLS_DIR:-/var/lib/postgresql/autoembed-tls}"
cert_now=$(psql -XtAc "show ssl_cert_file")
if { [ "$(psql -XtAc "show ssl")" != on ] || [[ "$cert_now" == *snakeoil* ]]; } \
   && [ ! -f "$tls_dir/ca.crt" -o "$cert_now" != "$tls_dir/server.crt" ] && command -v openssl >/dev/null; then
  log "turning TLS on (certificates in $tls_dir)"
  as_root mkdir -p "$tls_dir"
  (
    cd "$tls_dir"
    ca_ext=(-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign")
    as_root openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
      -subj "/CN=autoembed test CA" "${ca_ext[@]}" 2>/dev/null
    as_root openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout other-ca.key -out other-ca.crt \
      -subj "/CN=autoembed other CA" "${ca_ext[@]}" 2>/dev/null
    as_root openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
      | as_root tee ext.cnf >/dev/null
    as_root openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile ext.cnf -out server.crt 2>/dev/null
    as_root chown -R postgres:postgres "$tls_dir" 2>/dev/null || true
    as_root chmod 600 server.key
    as_root chmod 644 ca.crt other-ca.crt server.crt
  )
  psql -Xq -v ON_ERROR_STOP=1 \
    -c "ALTER SYSTEM SET ssl_cert_file = '$tls_dir/server.crt'" \
    -c "ALTER SYSTEM SET ssl_key_file = '$tls_dir/server.key'" \
    -c "ALTER SYSTEM SET ssl = on" \
    -c "SELECT pg_reload_conf()" >/dev/null
  for _ in $(seq 1 50); do [ "$(psql -XtAc "show ssl_cert_file")" = "$tls_dir/server.crt" ] && break; sleep 0.1; done
fi

# 2. One role that must give a password (the server trusts everyone else),
#    so that the tests can check what a wrong password gives.
hba=$(psql -XtAc "show hba_file")
if ! as_root grep -q autoembed_pwtest "$hba"; then
  log "adding role autoembed_pwtest with password authentication"
  psql -Xq -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'autoembed_pwtest') THEN
               CREATE ROLE autoembed_pwtest LOGIN PASSWORD 'autoembed-right-password'; END IF; END \$\$" >/dev/null
  { printf 'host all autoembed_pwtest 127.0.0.1/32 scram-sha-256\nhost all autoembed_pwtest ::1/128 scram-sha-256\n'
    as_root cat "$hba"; } > /tmp/autoembed-hba.$$
  as_root cp /tmp/autoembed-hba.$$ "$hba"
  rm -f /tmp/autoembed-hba.$$
  psql -Xq -c "SELECT pg_reload_conf()" >/dev/null
fi

# 3. pgbouncer, for the transaction-pooler tests (they start their own instance).
if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
  log "installing pgbouncer"
  apt_install pgbouncer
  # Debian starts a system instance on 6432; the tests run their own.
  as_root service pgbouncer stop >/dev/null 2>&1 || true
fi

# 4. Logical replication between two databases of this server, for the test
#    of rows that arrive by a subscription: wal_level = logical, which takes
#    a restart.
if [ "$(psql -XtAc "show wal_level")" != logical ]; then
  log "setting wal_level = logical (restarts PostgreSQL)"
  psql -Xq -v ON_ERROR_STOP=1 -c "ALTER SYSTEM SET wal_level = logical" >/dev/null
  version=$(psql -XtAc "show server_version_num" | cut -c1-2)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  for _ in $(seq 1 30); do pg_isready -q && break; sleep 1; done
  [ "$(psql -XtAc "show wal_level")" = logical ] || { log "wal_level is still not logical"; exit 1; }
fi
