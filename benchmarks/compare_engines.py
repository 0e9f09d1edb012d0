"""Two engines through `sdk.Embedder`, calls alternating in one process, with the time of each
call split into its parts: photo decode, preprocessing, the image and text graphs, the head, and
the rest (tokenization, batching, Python).

    .venv/bin/python benchmarks/compare_engines.py a.engine b.engine --call image+text:1 --call text:8 \
        [--json stages.json]

With `--json`, the medians go to a JSON file with the command, commit and tree state
(`benchmarks/run.sh` writes benchmarks/results/stages.json this way; `benchmarks/report.py
--stages` renders it as the "where the time goes" table).

One thread per engine; medians over `--rounds` calls after 20 warm-up calls each, the engines
alternating in blocks of 10 calls (one call each, alternating, would evict each engine's weights
from the CPU caches before its next call and inflate every stage). The inputs are
the sample products (data/samples). The vectors are checked too: every timed call of an engine
must return the vectors of its first call (cosine >= 0.99999), and the two engines' vectors are
compared (cosine mean and min, printed; below `--min-cosine` the script fails: two engines of one
model that disagree more than that are not timing the same work).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
BLOCK = 10  # consecutive calls of one engine before the other's


class _Timed:
    """Wraps a callable or an ONNX Runtime session and adds its time to `acc[name]`."""

    def __init__(self, target, name: str, acc: dict):
        self.target, self.name, self.acc = target, name, acc

    def __getattr__(self, attr):  # head attributes (config, d, text_dim) pass through
        return getattr(self.target, attr)

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.acc[self.name] += time.perf_counter() - t0

    def __call__(self, *args, **kwargs):
        return self._timed(self.target, *args, **kwargs)

    def run(self, *args, **kwargs):
        return self._timed(self.target.run, *args, **kwargs)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def compare(engines: list[str], modality: str, batch: int, rounds: int
            ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """({engine: {part: median ms}}, {engine: its vectors}) for one call kind ("image+text",
    "text", "image") and batch.

    Raises:
        SystemExit: an engine's timed call returned other vectors than its first call.
    """
    from bench_common import SAMPLES

    import sdk.embedder as embedder
    from sdk.bench import load_inputs, make_call
    from sdk.errors import TruncationWarning

    acc: dict[str, float] = collections.defaultdict(float)
    load_image, image_to_array = embedder.load_image, embedder.image_to_array
    embedder.load_image = _Timed(load_image, "photo decode", acc)
    embedder.image_to_array = _Timed(image_to_array, "preprocessing", acc)
    try:
        embs = {}
        for path in engines:
            emb = embedder.Embedder(path, threads=1)
            split = emb._runner
            if not hasattr(split, "image_session"):
                raise SystemExit(f"{path}: a split engine is needed (its parts are timed)")
            split.image_session = _Timed(split.image_session, "image graph", acc)
            split.text_session = _Timed(split.text_session, "text graph", acc)
            split.head = _Timed(split.head, "head", acc)
            embs[path] = emb
        images, titles, _ = load_inputs(SAMPLES, batch)
        kw = make_call(modality, images, titles)
        samples: dict[str, dict[str, list[float]]] = {p: collections.defaultdict(list) for p in embs}
        first: dict[str, np.ndarray] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            # blocks of BLOCK calls per engine, alternating: drift on a shared machine hits both, and
            # each engine's weights stay in the CPU caches within a block, as in a process that runs one
            for r in range(0, 20 + rounds, BLOCK):
                for path, emb in embs.items():
                    for i in range(r, min(r + BLOCK, 20 + rounds)):
                        acc.clear()
                        t0 = time.perf_counter()
                        v = emb.embed(**kw)
                        total = time.perf_counter() - t0
                        first.setdefault(path, v)
                        if _cosine_rows(v, first[path]).min() < 0.99999:
                            raise SystemExit(f"{path}: call {i} returned other vectors than the first call")
                        if i >= 20:
                            samples[path]["total"].append(total)
                            for part, sec in acc.items():
                                samples[path][part].append(sec)
    finally:
        embedder.load_image, embedder.image_to_array = load_image, image_to_array
    out = {}
    for path, parts in samples.items():
        med = {part: float(np.median(v)) * 1e3 for part, v in parts.items()}
        med["rest"] = med["total"] - sum(v for k, v in med.items() if k != "total")
        out[path] = med
    return out, first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs=2)
    ap.add_argument("--call", action="append", default=None, metavar="MODALITY:BATCH",
                    help="e.g. image+text:1 (repeatable; default image+text:1, image:1, text:1)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--min-cosine", type=float, default=0.99,
                    help="fail when the two engines' vectors have a cosine mean below this (default 0.99)")
    ap.add_argument("--json", type=Path, default=None, help="write the medians and vector checks here")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/compare_engines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict = {"command": cmd,
                    **provenance(), "engines": list(args.engines), "rounds": args.rounds, "threads": 1, "calls": {}}
    for call in args.call or ["image+text:1", "image:1", "text:1"]:
        modality, _, batch = call.partition(":")
        res, vectors = compare(args.engines, modality, int(batch or 1), args.rounds)
        a, b = (res[p] for p in args.engines)
        cos = _cosine_rows(*(vectors[p] for p in args.engines))
        print(f"== {modality}, batch {batch or 1}: medians of {args.rounds} calls, ms; "
              f"vectors of the two engines: cosine mean {cos.mean():.5f}, min {cos.min():.5f}")
        if cos.mean() < args.min_cosine:
            raise SystemExit(f"the two engines' vectors differ (cosine mean {cos.mean():.5f} < {args.min_cosine})")
        report["calls"][f"{modality}:{batch or 1}"] = {"ms": [a, b], "cosine_mean": float(cos.mean()),
                                                       "cosine_min": float(cos.min())}
        for part in ["total", *[k for k in a if k not in ("total", "rest")], "rest"]:
            ratio = a.get(part, 0) / max(b.get(part, 0), 1e-9)
            print(f"  {part:14s} {a.get(part, 0):9.3f} {b.get(part, 0):9.3f}   ratio {ratio:.2f}")
    if args.json is not None:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def provenance() -> dict:
    """Commit, tree state (uncommitted changes to tracked files other than the run's outputs),
    machine and load at the start."""
    import os
    import platform
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*a):
        r = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    from bench_common import tree_clean

    return {"commit": git("rev-parse", "HEAD"), "tree_clean": tree_clean(),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_avg_at_start": list(os.getloadavg())}}


if __name__ == "__main__":
    sys.exit(main())
