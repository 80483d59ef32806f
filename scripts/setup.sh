#!/usr/bin/env bash
# Installs everything Corral needs on a fresh Debian 12 machine (run as root): the OCI runtime and
# template tools from Debian, then a virtual environment with the pinned Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "corral: run this as root (it installs packages and the daemon creates namespaces and cgroups)" >&2
  exit 1
fi

APT_PACKAGES=(crun runc debootstrap busybox-static iproute2 procps file ca-certificates e2fsprogs util-linux
              nftables)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "corral: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Hibernation (pause to disk) needs CRIU 4.x, built from Debian trixie's source (about 30 s, once).
if ! bash scripts/build-criu.sh; then
  echo "corral: WARNING: CRIU could not be built; hibernation will be unavailable (see corral doctor)" >&2
fi

PY=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PY=$(command -v "$cand"); break
  fi
done
[ -n "$PY" ] || { echo "corral: needs Python 3.11 or newer" >&2; exit 1; }

if [ ! -x .venv/bin/python ] || ! cmp -s requirements.lock .venv/.corral-lock; then
  echo "corral: creating .venv with pinned dependencies (requirements.lock)"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.lock
  cp requirements.lock .venv/.corral-lock
fi
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
ln -sf "$PWD/.venv/bin/corral" /usr/local/bin/corral
echo "corral: ready ($(.venv/bin/corral doctor >/dev/null && echo 'host supports every required feature' || echo 'see corral doctor'))"
