#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Chromium for the dashboard's browser
# test (Playwright drives Debian's chromium; `playwright install` is never used), PostgreSQL
# for the storage tests on both databases, and nginx with its Lua module for the coordinator's
# gateway (`fedtune coordinator start` and the tests that start it). Installs with apt-get
# when run as root on Debian/Ubuntu; elsewhere it says what is missing.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
    || missing+=(postgresql)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing+=(libnginx-mod-http-lua)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (browser test, PostgreSQL tests, the coordinator's gateway)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "not installed: ${missing[*]} (the browser test skips; scripts/test.sh needs" \
        "PostgreSQL; the gateway, deployment and Docker tests need nginx and" \
        "libnginx-mod-http-lua)" >&2
fi
