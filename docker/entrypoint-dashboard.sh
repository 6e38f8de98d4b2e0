#!/usr/bin/env bash
# The dashboard container: `fedtune dashboard` (Streamlit, read-only on the coordinator's
# database), exec'd so that `docker stop` sends its SIGTERM straight to it.
#
# With arguments, runs them instead.
#
# Environment (defaults in brackets):
#   FEDTUNE_DATABASE_URL            [sqlite:////var/lib/fedtune/coordinator/fedtune.db]
#                                   the coordinator's database, no password in it
#   FEDTUNE_DATABASE_PASSWORD_FILE  [unset] a file holding the database password (a secret)
#   FEDTUNE_DASHBOARD_HOST          [0.0.0.0] listen address
#   FEDTUNE_DASHBOARD_PORT          [8501]
set -euo pipefail
# shellcheck source=docker/fedtune-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/fedtune-common.sh"

write_pgpass
if [ "$#" -gt 0 ]; then
    exec "$@"
fi

exec fedtune dashboard \
    --db "${FEDTUNE_DATABASE_URL:-sqlite:////var/lib/fedtune/coordinator/fedtune.db}" \
    --host "${FEDTUNE_DASHBOARD_HOST:-0.0.0.0}" \
    --port "${FEDTUNE_DASHBOARD_PORT:-8501}"
