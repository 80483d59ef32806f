#!/usr/bin/env bash
# README command 2: set up, then run every check and the whole test suite (unit, kernel, escape,
# integration, e2e). Stress runs are behind `-m stress` and not part of this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
.venv/bin/python scripts/gen_openapi.py --check
exec .venv/bin/pytest -m "not stress" "$@"
