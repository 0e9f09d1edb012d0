"""Think-then-embed latency against the reasoning-token budget, in one run.

    moon3 build --weights sdk/train/weights/trace --out trace.engine      # an engine that may reason
    MOON3_TRACE_ENGINE=trace.engine .venv/bin/python -m pytest benchmarks/test_bench_pipeline.py \
        --benchmark-group-by=group

Each timed call embeds one product (photo + title) with `sdk.Pipeline(reason="on",
max_trace_tokens=budget)`: the reasoner writes the trace from photo and title, then the embedder
reads photo, title and trace. Budget 0 is `reason="off"` (the embedder alone), the baseline the
others are compared with. No cache, so every round generates.

Recorded in extra_info: the budget, the trace tokens actually written (the mean over the
products), and the latency ratio to the embedder alone. The correctness check: the vector timed
equals a fresh `Pipeline` embedding of the same item with the same budget (greedy decoding is
deterministic) and, for budget 0, the plain `Embedder` vector.
"""

from __future__ import annotations

import numpy as np
import pytest
from bench_common import THREADS, engine_from_env, record

BUDGETS = (0, 16, 32, 64, 96)
N_ITEMS = 4
_latency: dict[int, float] = {}


@pytest.fixture(scope="module")
def trace_engine():
    path = engine_from_env("MOON3_TRACE_ENGINE")
    from sdk.engine import EngineFile

    manifest = EngineFile.open(path).manifest
    if not manifest.get("embedder", {}).get("trace_trained"):
        pytest.skip(f"{path}: its embedder was not trained with traces (build with --weights sdk/train/weights/trace)")
    if not isinstance(manifest.get("reasoner"), dict):
        pytest.skip(f"{path}: the engine has no reasoner")
    return path


@pytest.mark.parametrize("budget", BUDGETS)
def test_think_then_embed_latency(benchmark, trace_engine, products, budget):
    from sdk.embedder import Embedder
    from sdk.pipeline import Pipeline

    items = products[:N_ITEMS]
    reason = "on" if budget else "off"
    pipe = Pipeline(trace_engine, reason=reason, max_trace_tokens=max(budget, 1), threads=THREADS)
    state = {"i": 0, "tokens": []}

    def one():
        img, title = items[state["i"] % len(items)]
        state["i"] += 1
        v = pipe.embed([img], [title])
        if budget:
            state["tokens"].append(pipe.reasoner.last_stats.get("new_tokens", 0))
        return v

    benchmark.group = "think-then-embed, batch 1"
    v = benchmark(one)
    # the vector timed is the right one: the last item again, from a fresh pipeline
    img, title = items[(state["i"] - 1) % len(items)]
    again = Pipeline(trace_engine, reason=reason, max_trace_tokens=max(budget, 1), threads=THREADS).embed([img], [title])
    np.testing.assert_allclose(v, again, atol=1e-5)
    if not budget:
        np.testing.assert_allclose(v, Embedder(trace_engine, threads=THREADS).embed(images=[img], texts=[title]),
                                   atol=1e-5)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _latency[budget] = float(np.median(stats.stats.data))
    info = {"runner": "pipeline", "kind": "think-then-embed", "budget": budget,
            "trace_tokens": float(np.mean(state["tokens"])) if state["tokens"] else 0.0}
    if budget and 0 in _latency and budget in _latency:
        info["x_embedder_alone"] = _latency[budget] / _latency[0]
    record(benchmark, 1, **info)
