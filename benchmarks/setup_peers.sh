#!/usr/bin/env bash
# Create benchmarks/peers-venv: the peers that cannot live beside moon3-sdk's pinned toolchain.
#
# sentence-transformers' ONNX backend needs optimum-onnx, which pins transformers < 4.58 (the
# toolchain pins transformers 5), and fastembed 0.9.1 needs huggingface-hub < 2. So the ONNX
# peers get their own venv, with the same torch (2.13.0 CPU, pinned first: an unpinned request
# pulls a multi-GB CUDA build) and the moon3-sdk runtime (numpy + onnxruntime, no torch), so the
# engine runs beside them in the same benchmark run. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
V=benchmarks/peers-venv
[ -x $V/bin/python ] || "$PY" -m venv $V
$V/bin/python -m pip install -q --disable-pip-version-check -U pip
$V/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
echo "torch==2.13.0" > $V/constraints.txt
# The moon3-sdk runtime (and sdk._C) from this checkout with the peers (pyproject's bench-peers
# extra); the toolchain extra [export] stays out.
$V/bin/python -m pip install -q --disable-pip-version-check -c $V/constraints.txt -e ".[bench-peers]"
$V/bin/python -c "import importlib.metadata as m; print('peers-venv:', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'sentence-transformers', 'optimum-onnx', 'fastembed', 'onnxruntime', 'moon3-sdk')))"
