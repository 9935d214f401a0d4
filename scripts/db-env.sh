# Sourced by scripts/dev-db.sh and scripts/test-db.sh: the local server's
# connection defaults and the helpers both use. Set `name` before sourcing
# (the prefix of log lines).
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
export PGDATABASE="${PGDATABASE:-test}"
export PGOPTIONS="${PGOPTIONS:--c client_min_messages=warning}"
export DEBIAN_FRONTEND=noninteractive

log() { printf '%s: %s\n' "$name" "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
