#!/usr/bin/env bash
# Installs everything the tests, the bench and the demo need; safe to run again (each step
# is skipped when its result is already there). Debian, as root, no prompts.
set -euo pipefail
cd "$(dirname "$0")/.."

# build-essential .. openssl: OpenWrt's userland built from source (tools/owrt-userland.sh);
# meson .. zlib1g-dev: apk-tools v3 (tools/pkg-managers.sh, with opkg-lede and usign);
# busybox: OpenWrt's /bin/sh (ash) for its init scripts under procd.
APT_PACKAGES="nftables iproute2 mosquitto iperf3 chromium curl build-essential cmake pkg-config libjson-c-dev busybox openssl dnsmasq-base meson ninja-build libssl-dev zlib1g-dev"
VENV=${VENV:-.venv}
VENV_LATEST=${VENV_LATEST:-.venv-latest}
PYTHON=${PYTHON:-python3}

missing=()
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "deps: need root to apt-get install ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Two venvs: .venv with the library versions OpenWrt 24.10 ships (the router's), .venv-latest with
# the newest releases (requirements-latest.txt); `make test` runs the suite in the first and the
# tests of the parts that use those libraries in the second.
make_venv() {  # venv requirements-file
  local venv=$1 reqs=$2 stamp
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  stamp="$venv/.deps-$(cat pyproject.toml "$reqs" | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$reqs"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e .
    rm -f "$venv"/.deps-*
    touch "$stamp"
  fi
}
make_venv "$VENV" requirements-test.txt
make_venv "$VENV_LATEST" requirements-latest.txt

lockhash=$(sha256sum package-lock.json | cut -c1-16)
if [ ! -f "node_modules/.deps-$lockhash" ]; then
  npm ci --no-audit --no-fund --loglevel=error
  touch "node_modules/.deps-$lockhash"
fi

# OpenWrt's ubusd, rpcd, uhttpd, procd, libuci and LuCI from ../shared/openwrt-userland (cached in
# .cache/owrt), and the python3-ubus / python3-uci bindings built against them into the venv.
# Without the source tarballs the `owrt` tests skip and say why (CI treats that as a failure).
if [ -d "${OWRT_SOURCES:-../shared/openwrt-userland/sources}" ]; then
  PIP="$VENV/bin/pip" ./tools/owrt-userland.sh >/dev/null
  PIP="$VENV_LATEST/bin/pip" ./tools/owrt-userland.sh >/dev/null
  ./tools/pkg-managers.sh >/dev/null  # apk, opkg, usign (.cache/pkg-managers)
else
  echo "deps: no OpenWrt sources at ${OWRT_SOURCES:-../shared/openwrt-userland/sources}; owrt tests will skip" >&2
fi
