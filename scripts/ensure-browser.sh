#!/usr/bin/env bash
# Makes sure the dashboard's browser test has a headless Chromium: Debian's chromium and
# chromium-driver packages (Playwright drives /usr/bin/chromium and never downloads a browser
# of its own), and an emoji font for the state badges in screenshots. Installs them when
# missing and this is root with apt-get; otherwise says what is missing.
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium chromium-driver)
dpkg -s fonts-noto-color-emoji >/dev/null 2>&1 || need+=(fonts-noto-color-emoji)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "ensure-browser: missing ${need[*]} (Debian packages); the browser test needs them" >&2
fi
