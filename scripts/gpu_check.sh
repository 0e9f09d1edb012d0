#!/usr/bin/env bash
# One GPU check, for a lent GPU machine with no network: what this repository can only verify on a GPU.
#
#   bash scripts/gpu_check.sh OUT             # run every step, results under OUT
#   bash scripts/gpu_check.sh OUT --dry-run   # list the steps and write OUT/gpu_check.json, run nothing
#
# Steps (each recorded in OUT/gpu_check.json: passed / failed / skipped with the reason, seconds):
#   1. cuda-build    sdk/_cuda_ops.so for this machine's GPU (scripts/build_cuda.sh --arch native),
#                    unless one newer than csrc/cuda/fused.cu travelled with the tree;
#   2. cuda-tests    tests/csrc/test_cuda_fused.py with the `gpu` tests selected (JUnit XML in OUT);
#   3. cuda-timings  benchmarks/cuda_vs_torch.py: the kernels against torch-CUDA eager, host to
#                    host, results checked against the NumPy references (OUT/cuda_timings.json);
#   4. tensorrt      a TensorRT plan of the plain-op graphs and its parity: skipped with the reason
#                    while TensorRT is not installed or no plan builder exists in sdk.export.
# Needs what the machine has (python with numpy, pytest; torch with CUDA for step 3; nvcc for step 1
# unless the library travels); installs nothing. Every step runs even when an earlier one failed;
# the exit status is 1 when any step failed. A command exiting 75 (EX_TEMPFAIL) is recorded as
# skipped. Budget: well under 8 minutes on one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="" DRY=0
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $a" >&2; exit 2 ;;
        *) OUT=$a ;;
    esac
done
if [ -z "$OUT" ]; then echo "usage: bash scripts/gpu_check.sh OUT [--dry-run]" >&2; exit 2; fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
FAILED=0

record() {  # name status seconds reason command
    "$PY" - "$@" >> "$STEPS" <<'EOF'
import json, sys
name, status, seconds, reason, command = sys.argv[1:6]
print(json.dumps({"step": name, "status": status, "seconds": float(seconds), "reason": reason, "command": command}))
EOF
}

step() {  # name reason-to-skip-or-empty command...
    local name=$1 skip=$2; shift 2
    local cmd
    cmd=$(printf '%q ' "$@")
    if [ "$DRY" = 1 ]; then
        echo "[dry-run] $name: $cmd${skip:+ (would skip: $skip)}"
        record "$name" planned 0 "$skip" "$cmd"
        return
    fi
    if [ -n "$skip" ]; then
        echo "[skip] $name: $skip"
        record "$name" skipped 0 "$skip" "$cmd"
        return
    fi
    echo "[run] $name: $cmd"
    local t0=$SECONDS rc=0
    "$@" || rc=$?
    if [ "$rc" = 0 ]; then
        record "$name" passed $((SECONDS - t0)) "" "$cmd"
    elif [ "$rc" = 75 ]; then  # EX_TEMPFAIL: the command found nothing it can run here (its output says why)
        record "$name" skipped $((SECONDS - t0)) "the command found nothing to run on this machine (see its output)" "$cmd"
    else
        record "$name" failed $((SECONDS - t0)) "exit status $rc" "$cmd"
        FAILED=1
    fi
}

LIB=sdk/_cuda_ops.so
build_skip=""
if [ -f "$LIB" ] && [ "$LIB" -nt csrc/cuda/fused.cu ]; then
    build_skip="$LIB travelled with the tree and is newer than csrc/cuda/fused.cu"
elif ! command -v "${NVCC:-nvcc}" > /dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    build_skip="nvcc not found and no prebuilt $LIB"
fi
step cuda-build "$build_skip" bash scripts/build_cuda.sh --arch native --out "$LIB" --require
step cuda-tests "" "$PY" -m pytest -q -p no:cacheprovider tests/csrc/test_cuda_fused.py -m "gpu or not gpu" \
    --junitxml "$OUT/cuda_tests.xml"
step cuda-timings "" "$PY" benchmarks/cuda_vs_torch.py --out "$OUT/cuda_timings.json"
trt_skip=""
if ! "$PY" -c "import tensorrt" > /dev/null 2>&1; then
    trt_skip="TensorRT is not installed on this machine"
elif ! "$PY" -c "import sdk.export.trt_build" > /dev/null 2>&1; then
    trt_skip="no TensorRT plan builder in sdk.export yet (sdk.export.trt_ops only checks which graphs the parser reads)"
fi
step tensorrt "$trt_skip" "$PY" -m sdk.export.trt_build --check --out "$OUT/tensorrt.json"

"$PY" - "$OUT" "$DRY" <<'EOF'
import json, platform, subprocess, sys, time
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()]
try:
    gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
except (OSError, subprocess.SubprocessError):
    gpus = []
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    commit = ""
report = {"dry_run": dry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
          "machine": platform.platform(), "gpus": gpus, "steps": steps,
          "passed": all(s["status"] in ("passed", "skipped", "planned") for s in steps)}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(f"wrote {out / 'gpu_check.json'}: " + ", ".join(f"{s['step']} {s['status']}" for s in steps))
EOF
exit $FAILED
