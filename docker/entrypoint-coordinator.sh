#!/usr/bin/env bash
# The coordinator container: migrate the database (`fedtune db upgrade`), then run the Flower
# SuperLink with TLS and node authentication in the foreground (`fedtune coordinator start`,
# exec'd: `docker stop` sends its SIGTERM straight to it).
#
# With arguments, runs them instead (e.g. `fedtune coordinator enroll ...`).
#
# Environment (defaults in brackets):
#   FEDTUNE_COORDINATOR_CONFIG      an existing coordinator.toml to use as it is; when unset,
#                                   STATE_DIR/coordinator.toml is written from the variables below
#   FEDTUNE_STATE_DIR               [/var/lib/fedtune/coordinator] SuperLink state, runs, config
#   FEDTUNE_HOST                    [0.0.0.0] listen address
#   FEDTUNE_PORT                    [9092] the SuperLink's port (nodes and the Flower CLI)
#   FEDTUNE_CERTS_DIR               [/etc/fedtune/certs] ca.pem, server.pem, server.key (0600)
#   FEDTUNE_DATABASE_URL            [sqlite:///STATE_DIR/fedtune.db] SQLAlchemy URL, no password
#   FEDTUNE_DATABASE_PASSWORD_FILE  [unset] a file holding the database password (a secret)
#   FEDTUNE_ENCRYPTION_KEY_FILE     [unset] checkpoint key (`fedtune coordinator encryption-key`)
set -euo pipefail
# shellcheck source=docker/fedtune-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/fedtune-common.sh"

if [ "$#" -gt 0 ]; then
    write_pgpass
    exec "$@"
fi

state_dir=${FEDTUNE_STATE_DIR:-/var/lib/fedtune/coordinator}
config=${FEDTUNE_COORDINATOR_CONFIG:-}

write_pgpass

if [ -n "$config" ]; then
    [ -f "$config" ] || die "FEDTUNE_COORDINATOR_CONFIG=$config does not exist"
    database_url=$(python -c 'import sys
from fedtune.platform.config import load_coordinator_config
print(load_coordinator_config(sys.argv[1]).database_url)' "$config")
else
    certs=${FEDTUNE_CERTS_DIR:-/etc/fedtune/certs}
    database_url=${FEDTUNE_DATABASE_URL:-sqlite:///$state_dir/fedtune.db}
    for file in ca.pem server.pem server.key; do
        [ -f "$certs/$file" ] || die "$certs/$file is missing: run \`fedtune certs init\` (see docs/operations.md)"
    done
    mkdir -p "$state_dir"
    config=$state_dir/coordinator.toml
    {
        echo "# Written by ${0##*/} at every start from its environment; edits are lost."
        echo "[coordinator]"
        echo "state_dir = $(toml_string "$state_dir")"
        echo "host = $(toml_string "${FEDTUNE_HOST:-0.0.0.0}")"
        echo "port = ${FEDTUNE_PORT:-9092}"
        echo "database = $(toml_string "$database_url")"
        if [ -n "${FEDTUNE_ENCRYPTION_KEY_FILE:-}" ]; then
            echo "encryption_key_file = $(toml_string "$FEDTUNE_ENCRYPTION_KEY_FILE")"
        fi
        echo
        echo "[tls]"
        echo "ca_certificate = $(toml_string "$certs/ca.pem")"
        echo "certificate = $(toml_string "$certs/server.pem")"
        echo "private_key = $(toml_string "$certs/server.key")"
    } >"$config.tmp"
    mv -f "$config.tmp" "$config"
    say "configuration: $config"
fi

fedtune db upgrade --database "$database_url"
exec fedtune coordinator start --config "$config"
