#!/usr/bin/env bash
# Set up (idempotent), lint, then run the whole test suite against real FUSE mounts.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy cowfs
.venv/bin/python -m pytest "$@"
