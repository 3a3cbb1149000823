#!/usr/bin/env bash
# Builds OpenWrt's own userland from the source tarballs in ../shared/openwrt-userland/sources
# (override with OWRT_SOURCES) into a cached, git-ignored prefix, so the tests run the daemons a
# router runs: ubusd, rpcd, uhttpd (ubus + ucode), procd, libuci and the `uci` CLI, jshn and
# jsonfilter (rc.common), OpenWrt's shell library, LuCI 24.10's luci-base with its `luci.core`
# ucode module, and the PyPI bindings OpenWrt ships (ubus==0.1.3, pyuci==0.10.3) for a venv.
#
#   tools/owrt-userland.sh            build (or reuse) and print the prefix
#   tools/owrt-userland.sh --prefix   print the prefix a build would use, build nothing
#   PIP=.venv/bin/pip tools/owrt-userland.sh   also install the Python bindings into that venv
#
# The prefix is .cache/owrt/<hash of the tarballs and this script>: a new source or a change
# here builds afresh; an unchanged one costs nothing. Debian packages it needs: build-essential
# cmake pkg-config libjson-c-dev (tools/deps.sh installs them).
set -eEuo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
src_dir=${OWRT_SOURCES:-$top/../shared/openwrt-userland/sources}
if [ ! -d "$src_dir" ]; then
  echo "owrt-userland: no sources at $src_dir (set OWRT_SOURCES)" >&2
  exit 3
fi
src_dir=$(cd "$src_dir" && pwd)
TARBALLS="libubox ubus uci ucode rpcd uhttpd udebug jsonpath procd openwrt-shell-lib luci-24.10"
key=$( { for t in $TARBALLS; do sha256sum "$src_dir/$t.tar.gz" | cut -c1-64; done; sha256sum "$0" | cut -c1-64; } \
  | sha256sum | cut -c1-12)
prefix=$top/.cache/owrt/$key
if [ "${1:-}" = "--prefix" ]; then
  echo "$prefix"
  exit 0
fi

install_bindings() {
  # python3-ubus and python3-uci as OpenWrt ships them, compiled against this prefix's libraries.
  [ -n "${PIP:-}" ] || return 0
  local want="ubus==0.1.3 pyuci==0.10.3" stamp
  stamp="$(dirname "$PIP")/../.owrt-bindings-$key"
  [ -f "$stamp" ] && return 0
  CFLAGS="-I$prefix/usr/include" LDFLAGS="-L$prefix/usr/lib -Wl,-rpath,$prefix/usr/lib" \
    "$PIP" install -q --disable-pip-version-check --no-binary :all: --no-cache-dir --force-reinstall $want >&2
  rm -f "$(dirname "$PIP")"/../.owrt-bindings-*
  touch "$stamp"
}

if [ -f "$prefix/.done" ]; then
  install_bindings
  echo "$prefix"
  exit 0
fi

log=$top/.cache/owrt/build-$key.log
mkdir -p "$top/.cache/owrt"
rm -rf "$prefix" "$prefix.build"
mkdir -p "$prefix" "$prefix.build"
build=$prefix.build
: >"$log"
echo "owrt-userland: building into $prefix (log: $log)" >&2
trap 'echo "owrt-userland: build failed; last lines of $log:" >&2; tail -n 30 "$log" >&2' ERR

for t in $TARBALLS; do
  mkdir -p "$build/$t"
  tar -xzf "$src_dir/$t.tar.gz" -C "$build/$t"
done

# glibc 2.36 has no strlcpy (rpcd, procd) and hides vasprintf without _GNU_SOURCE (ucode's util.h
# seen from rpcd and uhttpd): one force-included header fixes both without touching the sources.
cat >"$build/compat.h" <<'EOF'
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
/* no libc header here: it would fix the feature macros before a source sets its own */
#include <stddef.h>
static inline size_t owrt_compat_strlcpy(char *d, const char *s, size_t n)
{
	size_t l = __builtin_strlen(s);
	if (n) {
		size_t c = l >= n ? n - 1 : l;
		__builtin_memcpy(d, s, c);
		d[c] = 0;
	}
	return l;
}
#define strlcpy owrt_compat_strlcpy
EOF

# Installed with prefix /usr under $prefix (DESTDIR), so every path compiled into the daemons is the
# one OpenWrt uses (/usr/share/rpcd/acl.d, /usr/lib/ucode, ...): inside a test's OpenWrt root they
# find their files where a router keeps them. The rpath points at the cache, so they run anywhere.
usr=$prefix/usr
link="-L$usr/lib -Wl,-rpath,$usr/lib"
cmake_build() {  # name [extra C flags] -- cmake options...
  local name=$1 cflags=$2 out=$build/$1/_b
  shift 2
  [ "$name" != jsonpath ] || out=$build/$name  # its lemon step runs in the source folder
  echo "== $name" >>"$log"
  cmake -S "$build/$name" -B "$out" \
    -DCMAKE_INSTALL_PREFIX=/usr -DCMAKE_PREFIX_PATH="$usr" -DCMAKE_INSTALL_LIBDIR=lib \
    -DCMAKE_INSTALL_RPATH="$usr/lib" -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
    -DCMAKE_C_FLAGS="-I$usr/include $cflags" \
    -DCMAKE_EXE_LINKER_FLAGS="$link" -DCMAKE_SHARED_LINKER_FLAGS="$link" -DCMAKE_MODULE_LINKER_FLAGS="$link" \
    "$@" >>"$log" 2>&1
  make -C "$out" -j"$(nproc)" >>"$log" 2>&1
  make -C "$out" install DESTDIR="$prefix" >>"$log" 2>&1
}
compat="-include $build/compat.h"

cmake_build libubox "" -DBUILD_LUA=OFF -DBUILD_EXAMPLES=OFF
cmake_build ubus "" -DBUILD_LUA=OFF -DBUILD_EXAMPLES=OFF
cmake_build uci "" -DBUILD_LUA=OFF -DBUILD_TESTS=OFF
cmake_build ucode "" -DRTNL_SUPPORT=OFF -DNL80211_SUPPORT=OFF -DUCI_SUPPORT=ON -DUBUS_SUPPORT=ON \
  -DULOOP_SUPPORT=ON -DZLIB_SUPPORT=OFF -DDIGEST_SUPPORT=OFF -DDIGEST_SUPPORT_EXTENDED=OFF
cmake_build rpcd "$compat" -DIWINFO_SUPPORT=OFF -DUCODE_SUPPORT=ON
cmake_build uhttpd "$compat -Wno-error=stringop-overread" -DTLS_SUPPORT=OFF -DLUA_SUPPORT=OFF -DUBUS_SUPPORT=ON \
  -DUCODE_SUPPORT=ON
cmake_build udebug "" -Ducode_include_dir="$usr/include"
cmake_build jsonpath ""
cmake_build procd "$compat -Wno-error=format-overflow" -DJAIL_SUPPORT=OFF -DSECCOMP_SUPPORT=OFF \
  -DUTRACE_SUPPORT=OFF -DSELINUX=OFF
ln -sf jsonpath "$usr/bin/jsonfilter"
# where OpenWrt keeps them (/sbin and /bin are /usr/sbin and /usr/bin on Debian)
ln -sf ../bin/uhttpd "$usr/sbin/uhttpd"
ln -sf ../bin/uci "$usr/sbin/uci"

# luci-base's `luci.core` ucode module (lmo translations and helpers the dispatcher loads).
echo "== luci.core" >>"$log"
luci=$build/luci-24.10/modules/luci-base
make -C "$luci/src" CC="${CC:-cc}" CFLAGS="-O2 -fPIC -I$usr/include" LDFLAGS="$link" \
  FPIC=-fPIC LUCI_VERSION=24.10 LUCI_GITBRANCH=openwrt-24.10 compile >>"$log" 2>&1

# $prefix is now a skeleton of an OpenWrt root (tests/support/owrt.py lays it over an overlay of /):
# usr/ from the builds above, OpenWrt's shell library at its paths, and luci-base plus the bootstrap
# theme where luci.mk installs them (htdocs -> /www, root -> /, ucode -> /usr/share/ucode/luci).
cp -a "$build/openwrt-shell-lib/." "$prefix/"
mkdir -p "$usr/share/libubox" "$usr/share/rpcd/acl.d" "$usr/lib/ucode/luci" "$usr/share/ucode/luci"
cp "$build/libubox/sh/jshn.sh" "$usr/share/libubox/jshn.sh"
cp "$build/rpcd/unauthenticated.json" "$usr/share/rpcd/acl.d/unauthenticated.json"
mkdir -p "$prefix/lib"
cp "$usr/lib/libsetlbf.so" "$prefix/lib/libsetlbf.so"  # procd preloads it from /lib
cp "$luci/src/core.so" "$usr/lib/ucode/luci/core.so"
cp "$luci/src/version.uc" "$usr/share/ucode/luci/version.uc"
for m in "$luci" "$build/luci-24.10/themes/luci-theme-bootstrap"; do
  [ ! -d "$m/htdocs" ] || { mkdir -p "$prefix/www"; cp -a "$m/htdocs/." "$prefix/www/"; }
  [ ! -d "$m/root" ] || cp -a "$m/root/." "$prefix/"
  [ ! -d "$m/ucode" ] || cp -a "$m/ucode/." "$usr/share/ucode/luci/"
done
find "$prefix/www" "$prefix/usr/share/ucode/luci" -name Makefile -delete
cp "$build/luci-24.10/LICENSE" "$build/luci-24.10/NOTICE" "$usr/share/ucode/luci/" 2>/dev/null || true

rm -rf "$build"
trap - ERR
touch "$prefix/.done"
echo "owrt-userland: built" >&2
install_bindings
echo "$prefix"
