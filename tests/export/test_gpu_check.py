"""scripts/gpu_check.sh in --dry-run mode (what CI can run), and the math of its torch-CUDA baseline
(benchmarks/cuda_vs_torch.py) on the CPU against the NumPy references the GPU run checks with."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_lists_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(out), "--dry-run"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["passed"]
    assert [s["step"] for s in report["steps"]] == ["cuda-build", "cuda-tests", "cuda-timings", "tensorrt"]
    assert all(s["status"] == "planned" and s["command"] for s in report["steps"])
    assert "tests/csrc/test_cuda_fused.py" in report["steps"][1]["command"]
    assert "[dry-run] cuda-timings" in r.stdout


def test_without_an_output_folder_it_says_how_to_call_it():
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "usage: bash scripts/gpu_check.sh OUT" in r.stderr


def test_torch_baseline_computes_what_the_kernels_compute():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cuda_vs_torch as b
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from sdk.fused import project_normalize_ref
    from sdk.ops import l2_normalize_ref

    c = b.cases(np.random.default_rng(1), 4)
    args, dim = c["project_normalize"]
    got = b.torch_project_normalize(torch, *[torch.from_numpy(a) for a in args], dim).numpy()
    np.testing.assert_allclose(got, project_normalize_ref(*args, dim), atol=2e-6)
    (x,), dim = c["l2_normalize"]
    np.testing.assert_allclose(b.torch_l2_normalize(torch, torch.from_numpy(x), dim).numpy(), l2_normalize_ref(x, dim),
                               atol=1e-6)
    if not torch.cuda.is_available():
        assert "skipped" in b.run(rounds=1)
