#!/usr/bin/env bash
# A node container: `fedtune node start` (the node's trainer + Flower SuperNode over TLS,
# restarted on failures), exec'd so that `docker stop` sends its SIGTERM straight to it and
# the coordinator marks the node offline at once.
#
# With arguments, runs them instead (e.g. `fedtune node keygen --out /var/lib/fedtune/node`).
#
# Environment (defaults in brackets):
#   FEDTUNE_NODE_CONFIG  [/etc/fedtune/node.toml] the node's node.toml, mounted read-only
#   FEDTUNE_STATE_DIR    [/var/lib/fedtune/node] must be the node.toml's node.state_dir: the
#                        health check looks for STATE_DIR/trainer.json there
#   FEDTUNE_CACHE_DIR    [/var/cache/fedtune] converted base models (`fedtune model fetch`)
set -euo pipefail
# shellcheck source=docker/fedtune-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/fedtune-common.sh"

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

config=${FEDTUNE_NODE_CONFIG:-/etc/fedtune/node.toml}
state_dir=${FEDTUNE_STATE_DIR:-/var/lib/fedtune/node}
[ -f "$config" ] || die "$config does not exist: mount the node's node.toml there (FEDTUNE_NODE_CONFIG)"

# Validate the config now (its errors name the file and the key) and check its state_dir.
configured=$(python -c 'import sys
from fedtune.platform.config import ConfigError, load_node_config
try:
    config = load_node_config(sys.argv[1])
except ConfigError as error:
    sys.exit(str(error))
if config.coordinator is None:
    sys.exit(f"{sys.argv[1]}: [coordinator] is required by fedtune node start")
print(config.node.state_dir)' "$config")
if [ "$(realpath -m "$configured")" != "$(realpath -m "$state_dir")" ]; then
    die "$config: node.state_dir is $configured, but FEDTUNE_STATE_DIR is $state_dir; make them the same"
fi
[ -f "$state_dir/node_key.pem" ] || die "$state_dir/node_key.pem is missing: run \`fedtune node keygen --out $state_dir\` and enroll the node (docs/operations.md)"

# A trainer.json left by a killed container names a process that is gone.
rm -f "$state_dir/trainer.json"
exec fedtune node start --config "$config"
