#!/usr/bin/env bash
# Build sdk/_cuda_ops.so, the CUDA kernels of the head's fused ops (csrc/cuda/fused.cu), with nvcc.
#
#   bash scripts/build_cuda.sh [--out PATH] [--arch "75 80 ..." | --arch native] [--require]
#
# The library is a plain shared object with a C ABI (csrc/cuda/fused.h), loaded by ctypes from
# sdk/cuda_ops.py; it is not a Python extension and does not depend on the Python version. The CUDA
# runtime is linked statically, so at run time it needs only the NVIDIA driver (libcuda.so.1).
#
# Architectures: SASS for each SM in --arch / $MOON3_CUDA_ARCHS (default below: Turing T4,
# A100, RTX 30xx / A10, Jetson Orin, RTX 40xx / L4, H100, B200, RTX 50xx) that this nvcc supports
# (`nvcc --list-gpu-arch`; the others are dropped with a note), plus PTX of the newest one, which
# the driver JIT-compiles on later GPUs. `--arch native` builds for the GPUs of this machine only.
# No host -march flags: the host code is plain C++.
#
# Without nvcc this prints why and exits 0 (nothing to build), so a wheel build can call it
# unconditionally; --require makes that an error. For a wheel that carries the kernels, run it
# before building and list the library as package data:
#
#   bash scripts/build_cuda.sh --require && python -m pip wheel . -w dist
#   # pyproject.toml: [tool.setuptools.package-data] "sdk" = [..., "_cuda_ops.so"]
#
# Env: NVCC (the compiler; default: nvcc on PATH, else $CUDA_HOME/bin/nvcc), MOON3_CUDA_ARCHS,
# MOON3_NVCC_FLAGS (extra nvcc flags; the tests add "-Werror all-warnings -Xcompiler -Werror").
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=sdk/_cuda_ops.so
ARCHS=${MOON3_CUDA_ARCHS:-"75 80 86 87 89 90 100 120"}
REQUIRE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --arch) ARCHS=$2; shift 2 ;;
        --require) REQUIRE=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "build_cuda.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc; fi
if [ -z "$NVCC" ] || ! command -v "$NVCC" >/dev/null; then
    echo "build_cuda.sh: nvcc not found (set NVCC or CUDA_HOME); the CUDA kernels are not built" >&2
    exit $((REQUIRE ? 1 : 0))
fi

if [ "$ARCHS" = native ]; then
    GENCODE=(-arch=native)
    BUILT=(native)
else
    SUPPORTED=$("$NVCC" --list-gpu-arch 2>/dev/null || true)  # compute_75, compute_80, ...
    GENCODE=()
    BUILT=()
    LAST=
    for sm in $ARCHS; do
        if [ -n "$SUPPORTED" ] && ! grep -qx "compute_$sm" <<<"$SUPPORTED"; then
            echo "build_cuda.sh: nvcc $("$NVCC" --version | grep -o 'release [0-9.]*') does not support sm_$sm; skipped" >&2
            continue
        fi
        GENCODE+=(-gencode "arch=compute_$sm,code=sm_$sm")
        LAST=$sm
        BUILT+=("sm_$sm")
    done
    if [ -z "$LAST" ]; then
        echo "build_cuda.sh: none of the architectures '$ARCHS' is supported by $NVCC" >&2
        exit 1
    fi
    GENCODE+=(-gencode "arch=compute_$LAST,code=compute_$LAST")  # PTX for newer GPUs
    BUILT+=("compute_$LAST PTX")
fi

mkdir -p "$(dirname "$OUT")"
TMP="$OUT.tmp.$$"
trap 'rm -f "$TMP"' EXIT
"$NVCC" -std=c++17 -O3 -shared --cudart static "${GENCODE[@]}" \
    -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Wextra ${MOON3_NVCC_FLAGS:-} \
    -o "$TMP" csrc/cuda/fused.cu
mv "$TMP" "$OUT"
echo "built $OUT for ${BUILT[*]}"
