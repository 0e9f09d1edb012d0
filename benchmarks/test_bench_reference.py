"""Latency of the FP32 PyTorch reference embedder (eager), the baseline compiled engines must beat.

    .venv/bin/python -m pytest benchmarks/test_bench_reference.py --benchmark-columns=median,ops,rounds
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


@pytest.fixture(scope="module")
def ref():
    from sdk.train.reference import ReferenceEmbedder

    return ReferenceEmbedder()


@pytest.fixture(scope="module")
def products():
    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(SAMPLES / it["image"], it["title"]) for it in items if it["image"]]


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("kind", ["text", "image+text"])
def test_reference_embed(benchmark, ref, products, batch, kind):
    imgs = [p for p, _ in products[:batch]] if kind == "image+text" else None
    texts = [t for _, t in products[:batch]]
    benchmark.group = f"reference {kind}"
    v = benchmark(ref.embed, images=imgs, texts=texts, batch_size=batch)
    assert v.shape == (batch, 256)
    benchmark.extra_info["items_per_s"] = batch / benchmark.stats["median"]
