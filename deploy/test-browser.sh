#!/usr/bin/env bash
# Install the headless browser the admin's browser test drives (Debian's chromium and chromium-driver), once.
# Quiet and idempotent: does nothing when both are there already.
set -euo pipefail

if command -v chromedriver >/dev/null 2>&1 && { [ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null 2>&1; }; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium and chromium-driver are missing and there is no apt-get: install them to run the browser test" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
echo "installing chromium and chromium-driver for the browser test"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
