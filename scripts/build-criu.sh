#!/usr/bin/env bash
# Builds CRIU 4.x for Corral's "hibernate" into /opt/corral-criu on a Debian 12 (bookworm) machine.
#
# Why: bookworm's criu 3.17 fails on recent kernels (vDSO handling); CRIU 4.x works. Debian trixie
# ships criu 4.x, but trixie's binary packages need a newer libc, so we build trixie's *source*
# package against bookworm's libraries:
#   - a separate apt sources file adds trixie as deb-src ONLY (no trixie binary can be installed);
#   - the build dependencies are bookworm's -dev packages, installed by name (no `apt-get build-dep`,
#     which would resolve against trixie's control file);
#   - only the `criu` binary is built (no docs, plugins, libcriu or python tools) and installed as
#     /opt/corral-criu/sbin/criu; it links against bookworm's shared libraries, which stay installed.
#
# Idempotent: exits at once when /opt/corral-criu/sbin/criu already reports version 4.x.
# Run as root. Environment: CORRAL_CRIU_PREFIX (default /opt/corral-criu), CORRAL_CRIU_JOBS
# (default 2), CORRAL_CRIU_KEEP_BUILD=1 to keep the build tree (it is printed).
set -euo pipefail

PREFIX=${CORRAL_CRIU_PREFIX:-/opt/corral-criu}
JOBS=${CORRAL_CRIU_JOBS:-2}
BIN="$PREFIX/sbin/criu"
SRC_LIST=/etc/apt/sources.list.d/corral-trixie-src.sources
START=$(date +%s)

say()  { echo "build-criu: $*"; }
die()  { echo "build-criu: ERROR: $*" >&2; exit 1; }
step() { echo "build-criu: [$(( $(date +%s) - START ))s] $*"; }

# Options for criu when runc drives it (runc checkpoint/restore --criu $BIN): point runc's
# environment at it with CRIU_CONFIG_FILE=$PREFIX/etc/criu-runc.conf. The default network lock
# runs iptables-restore, which bookworm does not install by default; this criu is built with
# libnftables, so lock with nftables instead.
write_conf() {
  [ -f "$PREFIX/etc/criu-runc.conf" ] && return 0
  [ -w "$PREFIX" ] || return 0
  install -d -m 0755 "$PREFIX/etc"
  printf '%s\n' "# criu options for runc checkpoint/restore (export CRIU_CONFIG_FILE=this file)" \
    "network-lock nftables" > "$PREFIX/etc/criu-runc.conf"
}

criu_major() { "$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n1; }

# Corral's patches to CRIU 4.1.1 (a criu built without them is rebuilt):
#   sockopt-passcred  Linux 6.16+ refuses SO_PASSCRED/SO_PASSSEC on sockets other than AF_UNIX and
#                     AF_NETLINK (EOPNOTSUPP), so 4.1.1 cannot dump any process holding an inet socket
#                     ("Can't get 1:16 opt"). Only read those options on unix/netlink sockets, as
#                     upstream CRIU does after checkpoint-restore/criu#2718.
PATCHES="sockopt-passcred"
MARK="$PREFIX/share/corral-criu-patches"

# 0. Fast path -------------------------------------------------------------------------------------
if [ -x "$BIN" ] && [ "$(criu_major "$BIN")" = 4 ] && [ "$(cat "$MARK" 2>/dev/null)" = "$PATCHES" ]; then
  write_conf
  say "already installed: $BIN ($("$BIN" --version | head -n1))"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run this as root (it adds an apt source and installs packages)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian only"
. /etc/os-release 2>/dev/null || true
[ "${VERSION_CODENAME:-}" = bookworm ] \
  || say "warning: written for Debian 12 (bookworm), this is ${PRETTY_NAME:-unknown}; trying anyway"

export DEBIAN_FRONTEND=noninteractive

# 1. trixie deb-src (source packages only) ---------------------------------------------------------
step "adding trixie source-only apt entry ($SRC_LIST)"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$KEYRING" ] || die "$KEYRING missing (install debian-archive-keyring)"
cat > "$SRC_LIST" <<EOF
# Added by Corral scripts/build-criu.sh: trixie SOURCE packages only (deb-src), used to build CRIU 4.x.
# Never add "deb" here: trixie binaries need a newer libc than bookworm has.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: $KEYRING
EOF

step "apt-get update"
apt-get update -qq || die "apt-get update failed (network? the trixie deb-src entry is in $SRC_LIST)"

# 2. Build dependencies from bookworm, by name -------------------------------------------------------
# Headers and tools criu/Makefile.config and the protobuf code generation need. Docs (asciidoc,
# xmlto) are not built, so not installed.
BUILD_DEPS=(
  build-essential dpkg-dev pkgconf
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler python3-protobuf
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev
  python3 iproute2
)
missing=()
for p in "${BUILD_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing bookworm build dependencies: ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "could not install build dependencies: ${missing[*]}"
else
  step "build dependencies already installed"
fi
# Guard: no trixie binary package may have slipped in.
if dpkg-query -W -f='${Package} ${Version}\n' 2>/dev/null | grep -E '\+deb13|~deb13' >/dev/null; then
  say "warning: packages with a deb13 version are installed (not by this script):"
  dpkg-query -W -f='${Package} ${Version}\n' | grep -E '\+deb13|~deb13' | sed 's/^/build-criu:   /'
fi

# 3. Fetch trixie's criu source ----------------------------------------------------------------------
# Normally `apt-get source` (it verifies the .dsc against trixie's signed Sources index and applies
# Debian's patches). Some package mirrors/proxies serve the upstream tarball but not the .dsc or
# .debian.tar.xz; then we fetch the upstream tarball alone with apt's own downloader, checking the
# SHA-256 that the signed Sources index lists for it, and build upstream sources without Debian's
# packaging patches (only the criu binary is built, which needs none of them).
WORK=$(mktemp -d /tmp/corral-criu-build.XXXXXX)
chmod 0755 "$WORK"   # apt downloads as the unprivileged _apt user
id _apt >/dev/null 2>&1 && chown _apt "$WORK"
if [ "${CORRAL_CRIU_KEEP_BUILD:-0}" != 1 ]; then
  trap 'rm -rf "$WORK"' EXIT
fi
URIS=$(cd "$WORK" && apt-get source --print-uris -qq criu/trixie 2>/dev/null) \
  || die "trixie's criu source is not in the apt index (apt-get update problem? see $SRC_LIST)"
ORIG_LINE=$(printf '%s\n' "$URIS" | grep -E "\.orig\.tar\.[a-z0-9]+' " | head -n1 || true)
[ -n "$ORIG_LINE" ] || die "no upstream tarball listed for criu/trixie: $URIS"
step "downloading criu source from trixie into $WORK"
if ( cd "$WORK" && apt-get source -qq criu/trixie ) >"$WORK/fetch.log" 2>&1; then
  SRCDIR=$(find "$WORK" -maxdepth 1 -mindepth 1 -type d -name 'criu-*' | head -n1)
  PATCHED="Debian source package $(basename "$WORK"/criu_*.dsc .dsc)"
else
  step "apt-get source failed ($(grep -m1 '^E:' "$WORK/fetch.log" | cut -c1-160)); the mirror lacks the Debian source package, fetching the upstream tarball only"
  # ORIG_LINE: 'URI' FILE SIZE SHA256:HEX
  read -r uri file _size hash <<<"$ORIG_LINE"
  uri=${uri//\'/}
  case "$hash" in SHA256:*) ;; *) die "no SHA-256 listed for $file ($hash)";; esac
  /usr/lib/apt/apt-helper download-file "$uri" "$WORK/$file" "$hash" >"$WORK/fetch2.log" 2>&1 \
    || { sed 's/^/build-criu:   | /' "$WORK/fetch2.log" >&2; die "could not download $uri"; }
  echo "${hash#SHA256:}  $WORK/$file" | sha256sum -c --quiet - || die "checksum mismatch for $file"
  mkdir "$WORK/src" && tar -xf "$WORK/$file" -C "$WORK/src" || die "could not unpack $file"
  SRCDIR=$(find "$WORK/src" -maxdepth 1 -mindepth 1 -type d | head -n1)
  PATCHED="upstream tarball $file (SHA-256 verified against trixie's signed Sources index; no Debian patches)"
fi
[ -n "$SRCDIR" ] && [ -f "$SRCDIR/Makefile" ] || die "unpacked criu source not found under $WORK"
step "source: $PATCHED"

# 3b. Corral's patches (see PATCHES above) ---------------------------------------------------------------
step "patching: $PATCHES"
python3 - "$SRCDIR/criu/sockets.c" <<'PY' || die "could not apply the sockopt-passcred patch"
import re
import sys

path = sys.argv[1]
src = open(path).read()
if "Corral patch sockopt-passcred" in src:
    sys.exit(0)
body_at = src.find("int dump_socket_opts(")
body = src[body_at:src.find("\n}\n", body_at)] if body_at >= 0 else ""
# The two options as 4.1.1 dumps them (whitespace-tolerant: Debian's patches may reindent).
block = re.compile(
    r"[ \t]*ret \|= dump_opt\(sk, SOL_SOCKET, SO_PASSCRED, &val\);\s*"
    r"soe->has_so_passcred = true;\s*soe->so_passcred = val \? true : false;\s*"
    r"ret \|= dump_opt\(sk, SOL_SOCKET, SO_PASSSEC, &val\);\s*"
    r"soe->has_so_passsec = true;\s*soe->so_passsec = val \? true : false;\n")
found = block.findall(body)
if len(found) != 1:
    if "SO_PASSCRED" in body and ("AF_UNIX" in body or "AF_NETLINK" in body):
        print("build-criu: this source already limits SO_PASSCRED to unix/netlink sockets")
        sys.exit(0)
    sys.exit("the SO_PASSCRED/SO_PASSSEC block of dump_socket_opts() was not found exactly once")
new = """	{
		/* Corral patch sockopt-passcred: Linux 6.16+ has these on unix and netlink sockets only. */
		int family = 0;
		socklen_t flen = sizeof(family);

		if (getsockopt(sk, SOL_SOCKET, SO_DOMAIN, &family, &flen) == 0 &&
		    (family == AF_UNIX || family == AF_NETLINK)) {
			ret |= dump_opt(sk, SOL_SOCKET, SO_PASSCRED, &val);
			soe->has_so_passcred = true;
			soe->so_passcred = val ? true : false;

			ret |= dump_opt(sk, SOL_SOCKET, SO_PASSSEC, &val);
			soe->has_so_passsec = true;
			soe->so_passsec = val ? true : false;
		}
	}
"""
open(path, "w").write(src.replace(found[0], new, 1))
PY

# 4. Build only the criu binary -----------------------------------------------------------------------
step "building criu (make -j$JOBS criu; log: $WORK/build.log)"
if ! ( cd "$SRCDIR" && nice -n 10 make -j"$JOBS" criu V=0 ) >"$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log" | sed 's/^/build-criu:   | /' >&2
  trap - EXIT
  die "make failed; full log kept at $WORK/build.log"
fi
[ -x "$SRCDIR/criu/criu" ] || die "build finished but $SRCDIR/criu/criu is missing"

# 5. Install --------------------------------------------------------------------------------------
step "installing $BIN"
install -d -m 0755 "$PREFIX/sbin"
install -s -m 0755 "$SRCDIR/criu/criu" "$BIN.new"   # stripped: 6 MB -> ~2 MB
mv -f "$BIN.new" "$BIN"
if ldd "$BIN" | grep -q 'not found'; then
  ldd "$BIN" | grep 'not found' | sed 's/^/build-criu:   /' >&2
  die "$BIN is missing shared libraries"
fi
[ "$(criu_major "$BIN")" = 4 ] || die "$BIN does not report version 4.x: $("$BIN" --version 2>&1 | head -n1)"

install -d -m 0755 "$PREFIX/share"
printf '%s\n' "$PATCHES" > "$MARK"
write_conf
step "done: $BIN (runc: export CRIU_CONFIG_FILE=$PREFIX/etc/criu-runc.conf)"
"$BIN" --version
