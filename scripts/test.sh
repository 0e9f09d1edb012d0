#!/usr/bin/env bash
# Install (idempotent) and run the default test suite (slow tests deselected in pyproject).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
