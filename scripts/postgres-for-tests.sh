#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests, from Debian's postgresql package.
#
#   scripts/postgres-for-tests.sh start [DIR]   start one (or find it running), print its URL
#   scripts/postgres-for-tests.sh stop [DIR]    stop it and delete its files
#
# DIR (default $FEDTUNE_POSTGRES_DIR, else /tmp/fedtune-postgres) holds the cluster, its
# socket, its log and its port. CI:
#   export FEDTUNE_TEST_POSTGRES_URL="$(scripts/postgres-for-tests.sh start)"
# Trust authentication on 127.0.0.1 only; no fsync: test data, never real data.
# Exit code 3: no PostgreSQL binaries (apt-get install postgresql).
set -euo pipefail
action=${1:-}
dir=${2:-${FEDTUNE_POSTGRES_DIR:-/tmp/fedtune-postgres}}

bin_dir() {
    local initdb
    initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
    initdb=${initdb:-$(command -v initdb || true)}
    [ -n "$initdb" ] && dirname "$initdb"
}

# initdb refuses to run as root: the cluster belongs to the postgres user then.
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

url() {
    echo "postgresql+psycopg://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
}

case $action in
start)
    bin=$(bin_dir) || {
        echo "no PostgreSQL binaries (initdb) found: apt-get install postgresql" >&2
        exit 3
    }
    if [ -f "$dir/port" ] && as_owner "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1; then
        url
        exit 0
    fi
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    if ! as_owner test -w "$dir"; then
        echo "$dir: the postgres user cannot write there; give a DIR under /tmp" >&2
        exit 1
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync \
            >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0));
print(s.getsockname()[1])' >"$dir/port"
    options="-c listen_addresses=127.0.0.1 -p $(cat "$dir/port") -k $dir"
    options+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    as_owner "$bin/pg_ctl" -w -D "$dir/data" -l "$dir/server.log" -o "$options" start \
        >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    url
    ;;
stop)
    bin=$(bin_dir) || exit 0
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -w -D "$dir/data" -m fast stop >/dev/null
    fi
    if [ -d "$dir" ]; then  # only what start made: never a DIR given by mistake
        rm -rf "$dir/data"
        rm -f "$dir/port" "$dir/initdb.log" "$dir/server.log"
        rmdir "$dir"
    fi
    ;;
*)
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
    ;;
esac
