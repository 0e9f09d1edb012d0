"""How much an engine's vectors depend on the batch they are embedded in: the sample products
embedded one at a time against the same products in batches of 8, 32 and 150 (cosine mean / min).

    .venv/bin/python benchmarks/batch_dependence.py moon3.engine

An INT8-dynamic engine takes one activation scale per tensor, i.e. per batch, so its vectors move
slightly with their batch neighbours; FP32 and FP16 engines do not (docs/reliability.md, "Batches").
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--items", type=int, default=150, help="sample products (at most 150)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 8, 32, all)")
    args = ap.parse_args(argv)
    from bench_common import SAMPLES

    from sdk import Embedder
    from sdk.bench import load_inputs
    from sdk.errors import TruncationWarning

    warnings.simplefilter("ignore", TruncationWarning)
    emb = Embedder(args.engine)
    images, titles, _ = load_inputs(SAMPLES, args.items)
    n = len(titles)
    for name, kw in (("photo+title", dict(images=images, texts=titles)), ("title", dict(texts=titles)),
                     ("photo", dict(images=images))):
        alone = np.concatenate([emb.embed(**{k: v[i : i + 1] for k, v in kw.items()}) for i in range(n)])
        for bs in args.batch or (8, 32, n):
            cos = (alone.astype(np.float64) * emb.embed(**kw, batch_size=bs)).sum(1)
            print(f"{name:12s} batches of {bs:3d} vs one at a time: cosine mean {cos.mean():.6f}  min {cos.min():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
