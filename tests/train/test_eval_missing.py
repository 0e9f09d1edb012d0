"""research.eval_missing: the metrics and the benchmark protocol, on tiny models and random features."""

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiny_completion import tiny_completion  # noqa: E402
from tiny_models import tiny_fusion  # noqa: E402

from research.eval_missing import QUERIES, evaluate, rouge_l  # noqa: E402


def test_rouge_l():
    assert rouge_l("Puma Men Black Shoes", "puma men black shoes") == 1.0
    assert rouge_l("a b c", "x y z") == 0.0 and rouge_l("", "a") == 0.0
    # LCS "men black" (2): precision 2/3, recall 2/4 -> F1 4/7
    assert rouge_l("men white black", "puma men black shoes") == pytest.approx(4 / 7)


def test_protocol_degrades_only_the_drawn_share():
    torch.manual_seed(0)
    n, T = 24, 5
    fusion, completion = tiny_fusion(), tiny_completion()
    mask = torch.ones(n, T)
    mask[::3, 3:] = 0
    features = SimpleNamespace(
        title=torch.randn(n, T, 16), title_mask=mask, detail=torch.randn(n, 7, 16), detail_mask=torch.ones(n, 7),
        flip_rows=np.arange(n))
    tokens = {"tokens": np.random.default_rng(0).standard_normal((n, 49, 32)).astype(np.float16),
              "flip": np.random.default_rng(1).standard_normal((n, 49, 32)).astype(np.float16)}
    keys = np.arange(n) // 2  # pairs share a title
    gen = (torch.randn(n, 4, 16), torch.ones(n, 4))
    empty = (torch.randn(1, 2, 16), torch.ones(1, 2))
    res = evaluate(features, fusion, completion, tokens, keys, np.arange(n), gen, empty, rates=(0.0, 1.0),
                   seeds=(0, 1))
    assert res["products"] == n and len(res["R@10"]) == 6 * len(QUERIES)
    for metric in ("R@1", "R@10"):
        for key, (none_lost, all_lost) in res[metric].items():
            q = key.rsplit(" | ", 1)[1]
            assert none_lost == pytest.approx(res[f"full gallery {metric}"][q])  # rate 0: the real gallery
            assert 0.0 <= all_lost <= 1.0
    # at rate 1 with the image dropped, every gallery item is its title alone: the very vector of
    # the text->mm query, so each query finds its own product first
    assert res["R@1"]["image missing | image dropped | text->mm"][1] == 1.0
    assert set(res["cosine to the real photo + title vector"]) == {
        "completion", "zero-filled", "image dropped", "generated", "empty", "title dropped"}
