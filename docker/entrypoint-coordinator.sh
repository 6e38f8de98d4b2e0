#!/usr/bin/env bash
# The coordinator container: migrate the database (`fedtune db upgrade`), then run the
# coordinator in the foreground (`fedtune coordinator start`, exec'd: `docker stop` sends its
# SIGTERM straight to it): the gateway (Debian's nginx with its Lua module, as this container's
# user) on FEDTUNE_HOST:FEDTUNE_PORT, the only port published, forwarding the Fleet API; the
# Flower SuperLink (TLS, node authentication) on 127.0.0.1:FEDTUNE_SUPERLINK_PORT, which only
# processes in this container's network namespace reach (admin commands, compose's `enroll`);
# and fedtune's SuperExec, which starts each run's ServerApp.
#
# With arguments, runs them instead (e.g. `fedtune coordinator enroll ...`).
#
# Environment (defaults in brackets):
#   FEDTUNE_COORDINATOR_CONFIG      an existing coordinator.toml to use as it is; when unset,
#                                   STATE_DIR/coordinator.toml is written from the variables below
#                                   (healthcheck.sh reads FEDTUNE_PORT, FEDTUNE_SUPERLINK_PORT and
#                                   FEDTUNE_CERTS_DIR either way: keep them in step with it)
#   FEDTUNE_STATE_DIR               [/var/lib/fedtune/coordinator] SuperLink state, gateway
#                                   configuration and logs (gateway/), runs, config
#   FEDTUNE_HOST                    [0.0.0.0] the gateway's listen address
#   FEDTUNE_PORT                    [9092] the gateway's port: nodes connect here (Fleet API only)
#   FEDTUNE_SUPERLINK_PORT          [9093] the SuperLink's port, on 127.0.0.1 only (Flower CLI,
#                                   `fedtune coordinator enroll`, `fedtune run ...`)
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

# The state folder, its config and logs: this account's only (`coordinator start` does the same).
umask 077
state_dir=${FEDTUNE_STATE_DIR:-/var/lib/fedtune/coordinator}
config=${FEDTUNE_COORDINATOR_CONFIG:-}

write_pgpass

if [ -n "$config" ]; then
    [ -f "$config" ] || die "FEDTUNE_COORDINATOR_CONFIG=$config does not exist"
else
    certs=${FEDTUNE_CERTS_DIR:-/etc/fedtune/certs}
    database=${FEDTUNE_DATABASE_URL:-sqlite:///$state_dir/fedtune.db}
    for name in FEDTUNE_PORT FEDTUNE_SUPERLINK_PORT; do
        [[ ${!name:-9092} =~ ^[0-9]{1,5}$ ]] || die "$name=${!name} is not a port number"
    done
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
        echo "superlink_port = ${FEDTUNE_SUPERLINK_PORT:-9093}"
        echo "database = $(toml_string "$database")"
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

# Validate the config now (its errors name the file and the key), before migrating anything.
database_url=$(python -c 'import sys
from fedtune.platform.config import ConfigError, load_coordinator_config
try:
    print(load_coordinator_config(sys.argv[1]).database_url)
except ConfigError as error:
    sys.exit(str(error))' "$config")

fedtune db upgrade --database "$database_url"
exec fedtune coordinator start --config "$config"
