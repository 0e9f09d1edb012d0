"""Helpers shared by the benchmark suites (imported by conftest.py and the test files).

Every benchmark stores in `extra_info`: what ran (runner, kind, precision, backend, modality,
batch), p50/p99 of its rounds (ms), items/s at the median, and the fidelity of the vectors it
timed (cosine to the FP32 reference), which it also asserts. `benchmarks/report.py` reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
CACHE = ROOT / ".cache" / "bench"
# Every runner gets the same number of threads. 1 by default: on a small machine shared with other
# jobs, 2 threads made every runtime slower (torch's OpenMP barriers and ONNX Runtime's pool wait
# for descheduled threads: 2x for the engine, up to 30x for torch eager). BENCH_THREADS=2 on an idle box.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
BATCHES = (1, 8, 32)
MODALITIES = ("image+text", "text", "image")


def tree_clean() -> bool | None:
    """True when no tracked file differs from the commit, apart from what a benchmark run writes
    itself (its output folder, BENCH_OUT or benchmarks/results, and docs/speed.md); None without git."""
    import subprocess

    out = os.environ.get("BENCH_OUT", "benchmarks/results")
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 f":(exclude){out}", ":(exclude)benchmarks/results", ":(exclude)docs/speed.md"],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return None if status.returncode != 0 else not status.stdout.strip()


def engine_from_env(var: str) -> Path:
    """The engine named by an environment variable, or a skip saying how to get one."""
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"{var} is not set: build an engine (`moon3 build`) and pass {var}=path/to/moon3.engine")
    path = Path(value)
    if not path.is_file():
        pytest.skip(f"{var}={value}: no such engine file")
    return path


def modality_call(modality: str, products: list[tuple[Path, str]], n: int) -> dict:
    imgs = [p for p, _ in products[:n]]
    texts = [t for _, t in products[:n]]
    return {"image+text": {"images": imgs, "texts": texts}, "text": {"texts": texts}, "image": {"images": imgs}}[modality]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def record(benchmark, items: int, **info) -> None:
    """p50/p99 (ms) of the rounds and items/s at the median into extra_info, with `info`."""
    benchmark.extra_info.update(info, items=items)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    data = np.asarray(stats.stats.data, np.float64)  # seconds per call, one per round
    median = float(np.median(data))
    benchmark.extra_info.update(
        p50_ms=median * 1e3,
        p99_ms=float(np.percentile(data, 99, method="inverted_cdf")) * 1e3,  # nearest rank: the max below 100 rounds
        min_ms=float(data.min()) * 1e3,  # the least disturbed round: ratios of minima drift least on a busy machine
        items_per_s=items / median,
    )


def check_fidelity(benchmark, got: np.ndarray, want: np.ndarray, min_mean: float = 0.99, min_min: float = 0.98,
                   against: str = "FP32 reference") -> None:
    """Assert the timed vectors are the right ones (cosine to the reference) and record it."""
    cos = cosine_rows(got, want)
    benchmark.extra_info.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), cosine_vs=against)
    assert cos.mean() >= min_mean and cos.min() >= min_min, (
        f"timed vectors differ from the {against}: cosine mean {cos.mean():.5f} (>= {min_mean}), "
        f"min {cos.min():.5f} (>= {min_min})"
    )


def fastest_torch_threads(fn, candidates=(1, THREADS)) -> int:
    """Set torch to the faster of `candidates` intra-op thread counts for fn (and return it).

    On a loaded shared machine, torch's OpenMP barriers wait for descheduled threads and 2 threads
    can be many times slower than 1; on an idle one 2 are faster. The torch baselines get their
    best setting, measured here, rather than a fixed one that favours the engine.
    """
    import time

    import torch

    best = None
    for n in dict.fromkeys(candidates):
        torch.set_num_threads(n)
        fn()
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        if best is None or min(t) < best[0]:
            best = (min(t), n)
    torch.set_num_threads(best[1])
    return best[1]


def ort_session(graph: bytes):
    """An ONNX Runtime CPU session of a serialized graph, made as the runtime makes them
    (`sdk.embedder.session_kwargs`), with BENCH_THREADS threads."""
    import onnxruntime as ort

    from sdk.sessions import session_kwargs

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(graph, opts, providers=providers, **session_kwargs(providers))


def ort_graph(name: str, nodes, inputs: dict, outputs: dict, weights: dict):
    """`ort_session` of a small opset-17 graph: inputs/outputs {name: shape} (float32, "B" the
    dynamic batch), weights {name: array} as initializers; checked with onnx.checker first."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    io = lambda d: [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in d.items()]  # noqa: E731
    graph = helper.make_graph(nodes, name, io(inputs), io(outputs),
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return ort_session(model.SerializeToString())
