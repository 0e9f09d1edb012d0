#!/usr/bin/env bash
# Create .venv and install moon3-sdk with the toolchain, test, benchmark and server extras (idempotent).
# torch is pinned to the 2.13.0 CPU wheel first: an unpinned torch request pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip with retries: a package index's connection can drop mid-download (a 100 MB wheel), so each
# install resumes partial downloads and, failing that, is tried again after a pause.
pip_install() {
    local try
    for try in 1 2 3; do
        if .venv/bin/python -m pip install -q --disable-pip-version-check --retries 10 --timeout 60 "$@"; then
            return 0
        fi
        echo "scripts/setup.sh: pip install $* failed (try $try of 3)" >&2
        sleep $((try * 15))
    done
    return 1
}
pip_install -U pip
# pip >= 25.1 resumes an interrupted download; older pip does not know the option.
if .venv/bin/python -m pip install --help 2>/dev/null | grep -q -- --resume-retries; then
    export PIP_RESUME_RETRIES=20
fi
pip_install torch==2.13.0
echo "torch==2.13.0" > .venv/constraints.txt
pip_install -c .venv/constraints.txt -e ".[export,test,bench,serve]"
.venv/bin/python -c "import sdk, torch; print(f'moon3-sdk {sdk.__version__} installed in .venv (torch {torch.__version__})')"
