#!/usr/bin/env bash
# The images' HEALTHCHECK: exit 0 when healthy, 1 (with the reason on stdout) when not.
#
#   healthcheck.sh coordinator  the gateway answers "ok" on https://127.0.0.1:$FEDTUNE_PORT/healthz
#                               [9092] with a certificate that $FEDTUNE_CERTS_DIR/ca.pem
#                               [/etc/fedtune/certs] verifies, and the SuperLink accepts TCP
#                               connections on 127.0.0.1:$FEDTUNE_SUPERLINK_PORT [9093]
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
    ca=${FEDTUNE_CERTS_DIR:-/etc/fedtune/certs}/ca.pem
    url=https://127.0.0.1:$port/healthz
    [ -r "$ca" ] || unhealthy "$ca cannot be read (FEDTUNE_CERTS_DIR)"
    # Python's urllib: the image needs no curl. The certificate always names 127.0.0.1.
    answer=$(python -c 'import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
with urllib.request.urlopen(sys.argv[1], context=context, timeout=3) as response:
    print(response.read().decode().strip())' "$url" "$ca" 2>&1) \
        || unhealthy "gateway $url: ${answer##*$'\n'}"
    [ "$answer" = ok ] || unhealthy "gateway $url answered: $answer"
    superlink_port=${FEDTUNE_SUPERLINK_PORT:-9093}
    # bash's /dev/tcp: the SuperLink (127.0.0.1 only) behind the gateway.
    if ! timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$superlink_port" 2>/dev/null; then
        unhealthy "the SuperLink does not accept connections on 127.0.0.1:$superlink_port"
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
