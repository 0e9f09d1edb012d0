"""The head's CUDA kernels (sdk.cuda_ops) against torch-CUDA eager doing the same math, host to host.

    python benchmarks/cuda_vs_torch.py --out OUT/cuda_timings.json [--rounds 50]

Both sides start from NumPy arrays on the host and end with NumPy arrays on the host, as the
runtime's head does (the CUDA library's entry points copy in and out; torch pays `.cuda()` and
`.cpu()`), so the ratio is what a caller sees. Every timed result is checked against the NumPy
reference (`sdk.fused.project_normalize_ref`, `sdk.ops.l2_normalize_ref`). Medians of `--rounds`
calls after warm-up, per op and batch. Run by `scripts/gpu_check.sh` on a GPU machine; without a
CUDA device (or torch with CUDA) it writes the reason and exits 75 (EX_TEMPFAIL: skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

D_MODEL, OUT_DIM = 256, 256
BATCHES = (1, 32, 256)


def torch_project_normalize(torch, q, ln_w, ln_b, w, b, dim: int):
    """`project_normalize` in torch eager (tensors on any device): LayerNorm, the first `dim`
    rows of the projection, L2 normalisation."""
    F = torch.nn.functional
    e = F.linear(F.layer_norm(q, (q.shape[-1],), ln_w, ln_b, eps=1e-5), w[:dim], b[:dim])
    return F.normalize(e, dim=-1, eps=1e-12)


def torch_l2_normalize(torch, x, dim: int):
    return torch.nn.functional.normalize(x[..., :dim], dim=-1, eps=1e-12)


def cases(rng: np.random.Generator, batch: int) -> dict:
    """op -> (its NumPy arguments, the Matryoshka width it returns)."""
    f = np.float32
    q = rng.standard_normal((batch, D_MODEL)).astype(f)
    ln_w, ln_b = (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(f), (0.1 * rng.standard_normal(D_MODEL)).astype(f)
    w, b = (rng.standard_normal((OUT_DIM, D_MODEL)) / 16).astype(f), (0.1 * rng.standard_normal(OUT_DIM)).astype(f)
    return {"project_normalize": ((q, ln_w, ln_b, w, b), 128),
            "l2_normalize": ((rng.standard_normal((batch, OUT_DIM)).astype(f),), 128)}


def _median_ms(fn, rounds: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(times), 4)


def run(rounds: int) -> dict:
    from sdk import cuda_ops
    from sdk.fused import project_normalize_ref
    from sdk.ops import l2_normalize_ref

    ops = cuda_ops.load()
    if ops is None:
        return {"skipped": f"no CUDA kernels: {cuda_ops.reason()}"}
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    refs = {"project_normalize": project_normalize_ref, "l2_normalize": l2_normalize_ref}
    torch_fns = {"project_normalize": torch_project_normalize, "l2_normalize": torch_l2_normalize}
    rng = np.random.default_rng(0)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rounds": rounds, "results": []}
    for batch in BATCHES:
        for op, (args, dim) in cases(rng, batch).items():
            want = refs[op](*args, dim)
            kernel = lambda: getattr(ops, op)(*args, dim)  # noqa: E731

            def eager():
                t = [torch.from_numpy(a).cuda() for a in args]
                y = torch_fns[op](torch, *t, dim).cpu().numpy()
                torch.cuda.synchronize()
                return y

            err = {"cuda": float(np.abs(kernel() - want).max()), "torch": float(np.abs(eager() - want).max())}
            ms = {"cuda": _median_ms(kernel, rounds), "torch": _median_ms(eager, rounds)}
            out["results"].append({"op": op, "batch": batch, "dim": dim, "ms": ms, "max_abs_err": err,
                                   "ratio_cuda_over_torch": round(ms["cuda"] / ms["torch"], 3)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args(argv)
    report = run(args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report)[:2000])
    if "skipped" in report:
        raise SystemExit(75)


if __name__ == "__main__":
    main()
