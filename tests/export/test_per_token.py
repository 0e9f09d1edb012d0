"""Per-token activation scales (sdk.export.per_token): right per row, batch-invariant, under every ORT optimization."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sdk.export.build import BuildConfig  # noqa: E402
from sdk.export.per_token import per_token_activations  # noqa: E402
from sdk.export.quantize import quantize_int8  # noqa: E402

LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
# rows a per-tensor scale cannot serve at once: one large, one tiny
ROW_MAGNITUDES = np.array([100.0, 1.0, 0.01, 3.0, 0.5], np.float32)


def _mlp(path, opset=18, d=64, h=48):
    """x (B, T, d) -> MatMul + bias -> Gelu-free ReLU -> MatMul: two quantizable matmuls in a row."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((d, h)).astype(np.float32), rng.standard_normal(h).astype(np.float32)
    w2 = rng.standard_normal((h, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 32])],
                          [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.save(m, str(path))

    def reference(x):
        return np.maximum(x @ w1 + b1, 0) @ w2

    return reference


def _run(path, x, level):
    o = ort.SessionOptions()
    o.graph_optimization_level = level
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _row_error(y, ref):
    return (np.abs(y - ref).max(-1) / np.abs(ref).max(-1)).max()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("per_token")
    reference = _mlp(d / "f32.onnx")
    quantize_int8(d / "f32.onnx", d / "tensor.onnx")
    quantize_int8(d / "f32.onnx", d / "token.onnx", activations="per-token")
    return reference, d


@pytest.mark.parametrize("level", LEVELS, ids=["unoptimized", "optimized"])
def test_each_row_gets_its_own_scale(graphs, level):
    reference, d = graphs
    x = np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32) * ROW_MAGNITUDES[None, :, None]
    ref = reference(x)
    assert _row_error(_run(d / "token.onnx", x, level), ref) < 0.03
    # the per-tensor scale, set by the 100x row, wipes out the 0.01x row: the pass is what fixes it
    assert _row_error(_run(d / "tensor.onnx", x, level), ref) > 0.5


@pytest.mark.parametrize("level", LEVELS, ids=["unoptimized", "optimized"])
def test_a_row_is_the_same_alone_or_in_any_batch(graphs, level):
    _, d = graphs
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 7, 64)).astype(np.float32) * rng.uniform(0.01, 50, (6, 7, 1)).astype(np.float32)
    alone = np.concatenate([_run(d / "token.onnx", x[i:i + 1], level) for i in range(6)])
    together = _run(d / "token.onnx", x, level)
    np.testing.assert_allclose(alone, together, rtol=0, atol=1e-5 * np.abs(together).max())
    tensor_alone = np.concatenate([_run(d / "tensor.onnx", x[i:i + 1], level) for i in range(6)])
    assert np.abs(tensor_alone - _run(d / "tensor.onnx", x, level)).max() > 1e-3 * np.abs(together).max()


def test_an_all_zero_row_quantizes_to_zero_not_nan(graphs):
    _, d = graphs
    x = np.zeros((1, 3, 64), np.float32)
    x[0, 1] = 5.0
    y = _run(d / "token.onnx", x, LEVELS[1])
    assert np.isfinite(y).all()


def test_the_rewrite_is_a_valid_graph_without_per_tensor_quantizers(graphs):
    _, d = graphs
    m = onnx.load(str(d / "token.onnx"))
    ops = {(n.domain or "", n.op_type) for n in m.graph.node}
    assert ("", "DynamicQuantizeLinear") not in ops and ("", "QuantizeLinear") in ops
    assert ops - {("", o) for o in ("ReduceMax", "ReduceMin", "Neg", "Max", "Mul", "Shape", "ConstantOfShape",
                                     "QuantizeLinear", "Add", "Relu")} == {("com.microsoft", "MatMulIntegerToFloat")}
    onnx.checker.check_model(m, full_check=True)


def test_an_old_opset_is_refused_with_the_reason(tmp_path):
    _mlp(tmp_path / "f32.onnx", opset=13)
    with pytest.raises(ValueError, match="opset 13; per-token scales need opset >= 18"):
        quantize_int8(tmp_path / "f32.onnx", tmp_path / "token.onnx", activations="per-token")


def test_a_graph_without_dynamic_quantization_is_refused(graphs, tmp_path):
    _, d = graphs
    with pytest.raises(ValueError, match="no DynamicQuantizeLinear"):
        per_token_activations(d / "f32.onnx", tmp_path / "x.onnx")


@pytest.mark.parametrize("kw, match", [({"int8_activations": "per-row"}, "int8_activations must be one of"),
                                       ({"int8_activations": "per-token", "precision": "fp32"}, "needs precision")])
def test_build_config_checks_the_activation_scales(kw, match):
    with pytest.raises(ValueError, match=match):
        BuildConfig(**kw)


def test_a_per_token_engine_gives_an_item_the_same_vector_alone_or_in_any_batch(tiny_int8_engines):
    from pictures import gradient

    from sdk import Embedder

    texts = ["red", "red cotton shirt for the men", "blue", "black leather shoes", "watch", "white sport dress"]
    images = [gradient(seed, 40 + 9 * seed, 30 + 5 * seed) for seed in range(len(texts))]
    diffs = {}
    for acts, path in tiny_int8_engines.items():
        emb = Embedder(path, threads=1)
        assert emb.batch_invariant is (acts == "per-token")
        worst = 0.0
        for kw in (dict(texts=texts), dict(images=images), dict(images=images, texts=texts)):
            n = len(next(iter(kw.values())))
            alone = np.concatenate([emb.embed(**{k: v[i:i + 1] for k, v in kw.items()}) for i in range(n)])
            for bs in (2, n):
                worst = max(worst, float(np.abs(alone - emb.embed(**kw, batch_size=bs)).max()))
        diffs[acts] = worst
    assert diffs["per-token"] <= 2e-6, diffs
    assert diffs["per-tensor"] > 10 * max(diffs["per-token"], 1e-7), diffs  # what the pass removes


def test_quantize_int8_names_an_unknown_activation_scheme(graphs, tmp_path):
    _, d = graphs
    with pytest.raises(ValueError, match=r"activations must be one of \('per-tensor', 'per-token'\), got 'per-row'"):
        quantize_int8(d / "f32.onnx", tmp_path / "x.onnx", activations="per-row")
