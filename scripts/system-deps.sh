#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Chromium for the dashboard's browser
# test (Playwright drives Debian's chromium; `playwright install` is never used). Installs
# with apt-get when run as root on Debian/Ubuntu; elsewhere it says what is missing, and the
# browser test skips with that reason.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (for the dashboard's browser test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
    echo "chromium is not installed: the dashboard's browser test will be skipped" >&2
fi
