#!/usr/bin/env bash
# Make sure a headless-capable Chromium is installed, for the report's browser test (tests/e2e/test_report_browser.py).
# Debian's `chromium` package, installed with apt-get when missing and we are root; otherwise a clear message.
# Idempotent: does nothing when chromium is already there. Set MPCTL_SKIP_CHROMIUM=1 to skip (the test then skips
# with that reason).
set -euo pipefail

say() { echo "ensure-chromium: $*" >&2; }

[[ -n "${MPCTL_SKIP_CHROMIUM:-}" ]] && { say "MPCTL_SKIP_CHROMIUM set; not installing"; exit 0; }

for bin in chromium chromium-browser; do
  if command -v "$bin" >/dev/null; then
    exit 0
  fi
done

if [[ "$(id -u)" -ne 0 ]]; then
  say "chromium not installed; run: sudo apt-get install chromium (the report's browser test skips without it)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  say "chromium not installed and apt-get is not available; install Chromium by other means"
  exit 0
fi
say "installing Debian's chromium with apt-get (once; about 100 MB)..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fonts-liberation is only a recommendation of the package, but without a font the text renders as boxes.
apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
command -v chromium >/dev/null || { say "apt-get install chromium did not provide a chromium binary"; exit 1; }
say "$(chromium --version 2>/dev/null | head -n1)"
