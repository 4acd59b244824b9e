#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the records tests and prints the URL to export
# as RECORDS_TEST_POSTGRES (not SIFUCALL_*: the daemon reads those as configuration keys and
# would refuse an unknown one). Usage: eval "$(scripts/test-postgres.sh start DIR)"; later
# scripts/test-postgres.sh stop DIR. PostgreSQL refuses to run as root, so as root the
# cluster belongs to the `postgres` user (Debian's package creates it).
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?data directory}
port=${PGTEST_PORT:-55432}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2
  exit 1
fi
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "$cmd" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_owner "$bin/initdb" -D "$dir" -U postgres -A trust --no-sync >/dev/null
    fi
    as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
    as_owner "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -qAt \
      -c "SELECT 1 FROM pg_database WHERE datname = 'sifucall_test'" | grep -q 1 \
      || as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres sifucall_test
    echo "export RECORDS_TEST_POSTGRES=postgres://postgres@127.0.0.1:$port/sifucall_test"
    echo "export RECORDS_TEST_POSTGRES_DIR=$dir"
    ;;
  stop)
    as_owner "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null || true
    ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
