"""Two engines through `sdk.Embedder`, calls alternating in one process, with the time of each
call split into its parts: photo decode, preprocessing, the image and text graphs, the head, and
the rest (tokenization, batching, Python).

    .venv/bin/python benchmarks/compare_engines.py a.engine b.engine --call image+text:1 --call text:8

One thread per engine; medians over `--rounds` calls after 20 warm-up calls each. The inputs are
the sample products (data/samples).
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


def compare(engines: list[str], modality: str, batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """{engine: {part: median ms}} for one call kind ("image+text", "text", "image") and batch."""
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
            split = emb._split
            if split is None:
                raise SystemExit(f"{path}: a split engine is needed (its parts are timed)")
            split.image_session = _Timed(split.image_session, "image graph", acc)
            split.text_session = _Timed(split.text_session, "text graph", acc)
            split.head = _Timed(split.head, "head", acc)
            embs[path] = emb
        images, titles, _ = load_inputs(SAMPLES, batch)
        kw = make_call(modality, images, titles)
        samples: dict[str, dict[str, list[float]]] = {p: collections.defaultdict(list) for p in embs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            for r in range(20 + rounds):
                for path, emb in embs.items():  # alternating: drift on a shared machine hits both
                    acc.clear()
                    t0 = time.perf_counter()
                    emb.embed(**kw)
                    total = time.perf_counter() - t0
                    if r >= 20:
                        samples[path]["total"].append(total)
                        for part, s in acc.items():
                            samples[path][part].append(s)
    finally:
        embedder.load_image, embedder.image_to_array = load_image, image_to_array
    out = {}
    for path, parts in samples.items():
        med = {part: float(np.median(v)) * 1e3 for part, v in parts.items()}
        med["rest"] = med["total"] - sum(v for k, v in med.items() if k != "total")
        out[path] = med
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs=2)
    ap.add_argument("--call", action="append", default=None, metavar="MODALITY:BATCH",
                    help="e.g. image+text:1 (repeatable; default image+text:1, image:1, text:1)")
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args(argv)
    for call in args.call or ["image+text:1", "image:1", "text:1"]:
        modality, _, batch = call.partition(":")
        res = compare(args.engines, modality, int(batch or 1), args.rounds)
        a, b = (res[p] for p in args.engines)
        print(f"== {modality}, batch {batch or 1}: medians of {args.rounds} calls, ms")
        for part in ["total", *[k for k in a if k not in ("total", "rest")], "rest"]:
            ratio = a.get(part, 0) / max(b.get(part, 0), 1e-9)
            print(f"  {part:14s} {a.get(part, 0):9.3f} {b.get(part, 0):9.3f}   ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
