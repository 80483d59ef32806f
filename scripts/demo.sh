#!/usr/bin/env bash
# README command 1: set up, start the daemon on the embedded default (SQLite under /var/lib/corral,
# API on 127.0.0.1:7770 and a unix socket), create a sandbox from the base template and run a
# command in it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
corral doctor
corral up --background
corral template build base          # debootstrap, about a minute the first time; cached afterwards
SB=$(corral sandbox create --template base)
echo "created $SB"
corral exec "$SB" -- python3 -c 'print(6*7)'
corral exec "$SB" -- sh -c 'echo "inside: $(hostname), uid $(id -u), $(cat /proc/self/uid_map | xargs)"'
corral sandbox ls
echo "try: corral shell $SB      (then: corral sandbox rm $SB)"
