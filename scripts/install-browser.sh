#!/usr/bin/env bash
# The playground's browser test drives Debian's Chromium (never a browser downloaded by a test tool).
# Installs it when missing; STEP1X_SKIP_BROWSER=1 skips this (and the test says it was skipped on purpose).
set -euo pipefail
[ "${STEP1X_SKIP_BROWSER:-}" = "1" ] && exit 0
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
