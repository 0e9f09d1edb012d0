"""Latency of a built engine through `sdk.Embedder` against the FP32 PyTorch teacher (eager), same
inputs, same run (compare the ratios; absolute times drift on shared machines).

    moon3 build --out moon3.engine
    MOON3_ENGINE=moon3.engine .venv/bin/python -m pytest benchmarks/test_bench_engine.py \
        --benchmark-columns=median,ops,rounds --benchmark-group-by=group
"""

import json
import os
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
ENGINE = Path(os.environ.get("MOON3_ENGINE", "moon3.engine"))


@pytest.fixture(scope="module")
def products():
    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(SAMPLES / it["image"], it["title"]) for it in items if it["image"]]


@pytest.fixture(scope="module")
def runners():
    if not ENGINE.is_file():
        pytest.skip(f"no engine at {ENGINE}: build one with `moon3 build` or set MOON3_ENGINE")
    from sdk.embedder import Embedder

    out = {"engine": Embedder(ENGINE).embed}
    try:
        from sdk.train.reference import ReferenceEmbedder
    except ImportError:
        return out
    out["torch-eager"] = ReferenceEmbedder().embed
    return out


@pytest.mark.parametrize("runner", ["engine", "torch-eager"])
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_embed_photo_and_title(benchmark, runners, products, runner, batch):
    if runner not in runners:
        pytest.skip("the PyTorch teacher needs moon3-sdk[export]")
    imgs = [p for p, _ in products[:batch]]
    texts = [t for _, t in products[:batch]]
    benchmark.group = f"photo+title, batch {batch}"
    v = benchmark(runners[runner], images=imgs, texts=texts, batch_size=batch)
    assert v.shape == (batch, 256)
    benchmark.extra_info["items_per_s"] = batch / benchmark.stats["median"]


@pytest.mark.parametrize("runner", ["engine", "torch-eager"])
def test_embed_text_query(benchmark, runners, runner):
    if runner not in runners:
        pytest.skip("the PyTorch teacher needs moon3-sdk[export]")
    benchmark.group = "text query, batch 1"
    v = benchmark(runners[runner], texts=["Men Black Analog Watch"])
    assert v.shape == (1, 256)
