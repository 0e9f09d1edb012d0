#!/usr/bin/env bash
# Install (idempotent) and run the default test suite (slow tests deselected in pyproject).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint first ([tool.ruff] in pyproject.toml: pycodestyle, pyflakes, import order): fails in seconds.
if ! .venv/bin/python -m ruff check .; then
    echo "scripts/test.sh: ruff check . failed (lint errors above; '.venv/bin/ruff check --fix .' fixes the safe ones)" >&2
    exit 1
fi
# The import layers ([tool.importlinter] in pyproject.toml: each layer imports only those below it, no cycles).
if ! .venv/bin/lint-imports --no-cache > .venv/lint-imports.log 2>&1; then
    cat .venv/lint-imports.log >&2
    echo "scripts/test.sh: lint-imports failed (the broken contract and the imports that break it are above)" >&2
    exit 1
fi
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
