#!/usr/bin/env bash
# Builds OpenWrt's package managers from the source tarballs in ../shared/openwrt-userland/sources
# (override with OWRT_SOURCES) into a cached, git-ignored prefix: apk-tools v3.0.2 (`apk`, what
# 25.12 installs and builds .apk with: mkpkg, mkndx), opkg-lede (24.10's `opkg`, statically linked
# against its own libubox build) and usign (signs and checks opkg feeds).
#
#   tools/pkg-managers.sh            build (or reuse) and print the prefix (bin/apk, bin/opkg, bin/usign)
#   tools/pkg-managers.sh --prefix   print the prefix a build would use, build nothing
#
# The prefix is .cache/pkg-managers/<hash of the tarballs and this script>: a new source or a
# change here builds afresh. Debian packages it needs: build-essential cmake pkg-config
# libjson-c-dev meson ninja-build libssl-dev zlib1g-dev (tools/deps.sh installs them).
set -eEuo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
src_dir=${OWRT_SOURCES:-$top/../shared/openwrt-userland/sources}
if [ ! -d "$src_dir" ]; then
  echo "pkg-managers: no sources at $src_dir (set OWRT_SOURCES)" >&2
  exit 3
fi
src_dir=$(cd "$src_dir" && pwd)
TARBALLS="libubox opkg usign apk-tools"
key=$( { for t in $TARBALLS; do sha256sum "$src_dir/$t.tar.gz" | cut -c1-64; done; sha256sum "$0" | cut -c1-64; } \
  | sha256sum | cut -c1-12)
prefix=$top/.cache/pkg-managers/$key
if [ "${1:-}" = "--prefix" ]; then
  echo "$prefix"
  exit 0
fi
if [ -f "$prefix/.done" ]; then
  echo "$prefix"
  exit 0
fi

log=$top/.cache/pkg-managers/build-$key.log
mkdir -p "$top/.cache/pkg-managers"
rm -rf "$prefix" "$prefix.build"
mkdir -p "$prefix/bin" "$prefix.build"
build=$prefix.build
: >"$log"
echo "pkg-managers: building into $prefix (log: $log)" >&2
trap 'echo "pkg-managers: build failed; last lines of $log:" >&2; tail -n 30 "$log" >&2' ERR

for t in $TARBALLS; do
  mkdir -p "$build/$t"
  tar -xzf "$src_dir/$t.tar.gz" -C "$build/$t"
  # some archives have a top folder (apk-tools-<sha>/), others not
  if [ ! -e "$build/$t/CMakeLists.txt" ] && [ ! -e "$build/$t/meson.build" ]; then
    sub=$(find "$build/$t" -mindepth 1 -maxdepth 1 -type d | head -n1)
    mv "$build/$t" "$build/$t.x" && mv "$build/$t.x/${sub##*/}" "$build/$t" && rmdir "$build/$t.x"
  fi
done

ubox=$build/ubox-prefix
cmake_build() {  # name -- cmake options...
  local name=$1
  shift
  echo "== $name" >>"$log"
  cmake -S "$build/$name" -B "$build/$name/_b" -DCMAKE_INSTALL_PREFIX="$ubox" -DCMAKE_PREFIX_PATH="$ubox" \
    -DCMAKE_INSTALL_LIBDIR=lib -DCMAKE_C_FLAGS="-I$ubox/include" "$@" >>"$log" 2>&1
  make -C "$build/$name/_b" -j"$(nproc)" >>"$log" 2>&1
}

# opkg-lede wants libubox (static, so the binary carries it); usign has no dependencies
cmake_build libubox -DBUILD_LUA=OFF -DBUILD_EXAMPLES=OFF
make -C "$build/libubox/_b" install >>"$log" 2>&1
# ENABLE_USIGN: as OpenWrt builds it with signature checking (`option check_signature`, verify_program)
cmake_build opkg -DSTATIC_UBOX=ON -DBUILD_TESTS=OFF -DENABLE_USIGN=ON -DCMAKE_EXE_LINKER_FLAGS="-L$ubox/lib"
cp "$build/opkg/_b/src/opkg-cl" "$prefix/bin/opkg" 2>/dev/null || cp "$build/opkg/_b/src/opkg" "$prefix/bin/opkg"
cmake_build usign
cp "$build/usign/_b/usign" "$prefix/bin/usign"

# apk-tools v3 as OpenWrt 25.12 builds it for the host (static libapk, openssl crypto, no docs)
echo "== apk-tools" >>"$log"
(cd "$build/apk-tools" && VERSION=3.0.2 meson setup _b -Ddefault_library=static -Ddocs=disabled -Dhelp=disabled \
  -Dlua=disabled -Dpython=disabled -Dtests=disabled -Dcompressed-help=false -Dcrypto_backend=openssl \
  -Dzstd=disabled) >>"$log" 2>&1
VERSION=3.0.2 ninja -C "$build/apk-tools/_b" >>"$log" 2>&1
cp "$build/apk-tools/_b/src/apk" "$prefix/bin/apk"

rm -rf "$build"
trap - ERR
touch "$prefix/.done"
echo "pkg-managers: built" >&2
echo "$prefix"
