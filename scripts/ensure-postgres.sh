#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl) exist for the tests' throwaway clusters.
# The tests start and stop their own server; this only installs the binaries when they are missing and we can.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
   || [ -n "${DATAMART_TEST_PG_URL:-}" ] || [ -n "${DATAMART_PG_BIN:-}" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL server binaries missing: installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
  # Debian starts a default cluster; the tests use their own, so stop it.
  service postgresql stop >/dev/null 2>&1 || true
  exit 0
fi
echo "PostgreSQL server binaries missing and cannot be installed here (not root, or no apt-get):" >&2
echo "install PostgreSQL 15+ or set DATAMART_TEST_PG_URL; PostgreSQL tests will be skipped (failed under CI=true)." >&2
