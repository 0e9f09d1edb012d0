"""Cost of completing a missing photo: a title embedded alone, with its image completed from the
title (`complete_missing="image"`), and with its real photo, through sdk.Embedder, in one run.

    MOON3_ENGINE=moon3.engine .venv/bin/python -m pytest benchmarks/test_bench_completion.py \
        --benchmark-group-by=group --benchmark-columns=median,ops,rounds

The ratio that matters is "title + completed image" over "title alone" (the extra graph runs on
the title's token states only) against "photo + title" (what the completion stands in for).
Every timed call is checked against the same call made before timing.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
KINDS = ("title alone", "title + completed image", "photo + title")


@pytest.fixture(scope="module")
def embedder():
    from sdk.embedder import Embedder

    engine = Path(os.environ.get("MOON3_ENGINE", "moon3.engine"))
    if not engine.is_file():
        pytest.skip(f"no engine at {engine}: build one with `moon3 build` or set MOON3_ENGINE")
    e = Embedder(engine)
    if "image" not in e.completes:
        pytest.skip(f"{engine} has no completion part (sdk/train/weights/completion did not fit its embedder)")
    return e


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("kind", KINDS)
def test_completion_cost(benchmark, embedder, kind, batch):
    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    items = [it for it in items if it["image"]][:batch]
    kw = {"texts": [it["title"] for it in items]}
    if kind == "photo + title":
        kw["images"] = [SAMPLES / it["image"] for it in items]
    if kind == "title + completed image":
        kw["complete_missing"] = "image"
    want = embedder.embed(**kw)
    benchmark.group = f"completion cost, batch {batch}"
    benchmark.extra_info.update(kind=kind, batch=batch, items_per_s_note="ops x batch")
    got = benchmark(embedder.embed, **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
