#!/usr/bin/env bash
# The images' HEALTHCHECK: exit 0 when healthy, 1 (with the reason on stdout) when not.
#
#   healthcheck.sh coordinator  a TCP connection to 127.0.0.1:$FEDTUNE_PORT [9092] opens
#   healthcheck.sh dashboard    Streamlit answers "ok" on
#                               http://127.0.0.1:$FEDTUNE_DASHBOARD_PORT/_stcore/health [8501]
#   healthcheck.sh node         $FEDTUNE_STATE_DIR/trainer.json [/var/lib/fedtune/node] exists
#                               and the `fedtune node start` process it names is alive
set -euo pipefail

unhealthy() {
    echo "unhealthy: $*"
    exit 1
}

case ${1:-} in
coordinator)
    port=${FEDTUNE_PORT:-9092}
    # bash's /dev/tcp: the image needs no curl or netcat for this.
    if ! timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
        unhealthy "nothing accepts connections on 127.0.0.1:$port"
    fi
    ;;
dashboard)
    port=${FEDTUNE_DASHBOARD_PORT:-8501}
    answer=$(python -c 'import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as response:
    print(response.read().decode().strip())' "http://127.0.0.1:$port/_stcore/health" 2>&1) \
        || unhealthy "http://127.0.0.1:$port/_stcore/health: ${answer##*$'\n'}"
    [ "$answer" = ok ] || unhealthy "http://127.0.0.1:$port/_stcore/health answered: $answer"
    ;;
node)
    service=${FEDTUNE_STATE_DIR:-/var/lib/fedtune/node}/trainer.json
    [ -f "$service" ] || unhealthy "$service does not exist (is the base model still loading?)"
    pid=$(python -c 'import json, sys
print(int(json.load(open(sys.argv[1]))["pid"]))' "$service" 2>/dev/null) \
        || unhealthy "$service cannot be read"
    kill -0 "$pid" 2>/dev/null || unhealthy "process $pid named in $service is not running"
    grep -q fedtune "/proc/$pid/cmdline" 2>/dev/null \
        || unhealthy "process $pid named in $service is not fedtune"
    ;;
*)
    echo "usage: ${0##*/} coordinator|dashboard|node" >&2
    exit 2
    ;;
esac
echo healthy
