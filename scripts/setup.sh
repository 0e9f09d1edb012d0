#!/usr/bin/env bash
# Create .venv and install moon3-sdk with the toolchain, test, benchmark and server extras (idempotent).
# torch is pinned to the 2.13.0 CPU wheel first: an unpinned torch request pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
echo "torch==2.13.0" > .venv/constraints.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -c .venv/constraints.txt -e ".[export,test,bench,serve]"
.venv/bin/python -c "import sdk, torch; print(f'moon3-sdk {sdk.__version__} installed in .venv (torch {torch.__version__})')"
