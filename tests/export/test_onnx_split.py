"""The split export's text graph: a BERT tower exports with ONNX Runtime's fused attention and GELU
(`sdk.export.onnx_split.FusedBertTextGraph`), any other tower, or `fused_text=False`, plainly."""

import collections

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sdk.export.onnx_split import FusedBertTextGraph, SplitExportConfig, export_split_onnx, fusable_bert  # noqa: E402

PLAIN_ATTENTION_OPS = {"Softmax", "Erf", "Transpose"}


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _bert(**overrides):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=100, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40)
    return BertModel(BertConfig(**{**cfg, **overrides})).eval()


def _graph(text_encoder):
    from tiny_models import PooledImageTower, tiny_fusion

    from sdk.export.onnx_embedder import EmbedderGraph

    return EmbedderGraph(PooledImageTower(), text_encoder, tiny_fusion()).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny graph (a BERT text tower with hidden size 16) exported fused and plain."""
    import torch
    from tiny_models import tiny_bert

    torch.manual_seed(3)
    graph = _graph(tiny_bert())
    out = {}
    for fused in (True, False):
        folder = tmp_path_factory.mktemp(f"split_fused_{fused}")
        paths = export_split_onnx(graph, SplitExportConfig(folder, num_threads=1, fused_text=fused,
                                                           check_batches=((3, 7, 4),)))
        out[fused] = paths
    return out


def test_bert_text_graph_is_fused(exports):
    ops = _ops(exports[True]["text"])
    assert ops["MultiHeadAttention"] == 1 and ops["Gelu"] == 1  # tiny_bert has one layer
    assert not PLAIN_ATTENTION_OPS & set(ops), ops
    assert ops["MatMul"] == 6  # q, k, v, output, ffn in, ffn out: still MatMuls, quantizable as before
    plain = _ops(exports[False]["text"])
    assert "MultiHeadAttention" not in plain and "Gelu" not in plain and "Softmax" in plain


def test_fused_and_plain_text_graphs_agree_on_real_tokens(exports):
    rng = np.random.default_rng(1)
    lengths = [1, 2, 5, 9, 9, 3]  # padded to 9; one row of a single token
    ids = rng.integers(5, 100, (len(lengths), 9)).astype(np.int64)
    mask = (np.arange(9)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    fused = _session(exports[True]["text"]).run(["token_states"], feed)[0]
    plain = _session(exports[False]["text"]).run(["token_states"], feed)[0]
    real = mask.astype(bool)
    np.testing.assert_allclose(fused[real], plain[real], atol=2e-5)
    # a row's states do not depend on its padding (the keys beyond its length get zero weight)
    alone = _session(exports[True]["text"]).run(["token_states"],
                                                 {"input_ids": ids[:1, :1], "attention_mask": mask[:1, :1]})[0]
    np.testing.assert_allclose(alone[0, 0], fused[0, 0], atol=2e-5)


@pytest.mark.parametrize("overrides, fusable", [
    ({}, True),
    ({"hidden_act": "gelu_new"}, False),  # tanh approximation: com.microsoft Gelu is the erf one
    ({"hidden_act": "relu"}, False),
    ({"position_embedding_type": "relative_key"}, False),
    ({"is_decoder": True}, False),
])
def test_fusable_bert(overrides, fusable):
    assert fusable_bert(_bert(**overrides)) is fusable


def test_fusable_bert_refuses_other_modules():
    from torch import nn

    from sdk.export.onnx_tools import ExportError

    assert not fusable_bert(nn.Linear(4, 4))
    with pytest.raises(ExportError, match="needs a BERT encoder with exact GELU"):
        FusedBertTextGraph(nn.Linear(4, 4))


def test_fused_text_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match="fused_text must be True or False, got 'no'"):
        SplitExportConfig(tmp_path, fused_text="no")


def test_a_tower_that_cannot_be_fused_exports_plainly_and_passes_parity(tmp_path):
    import json

    graph = _graph(_bert(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1,
                         hidden_act="gelu_new"))
    paths = export_split_onnx(graph, SplitExportConfig(tmp_path, num_threads=1, check_batches=((2, 5, 3),)))
    report = json.loads((tmp_path / "split.parity.json").read_text())
    assert report["passed"] and report["text_graph"] == "plain"
    assert "MultiHeadAttention" not in _ops(paths["text"])


def test_trt_parser_reads_the_plain_graphs_and_names_what_it_would_refuse(exports, tmp_path):
    """The plain-op graphs (plain text graph, image graph, symmetric static INT8) are what TensorRT's
    ONNX parser reads; the fused text graph's contrib ops, onnxruntime's dynamic INT8 and unsigned
    (asymmetric) Q/DQ are refused, each node named."""
    from sdk.calib import CalibrationSet, quantize_static_qdq
    from sdk.export.onnx_tools import ExportError
    from sdk.export.quantize import fold_constants, quantize_int8
    from sdk.export.trt_ops import require_trt_parsable, trt_unsupported

    plain, fused = exports[False], exports[True]
    assert trt_unsupported(plain["image"]) == [] and trt_unsupported(plain["text"]) == []
    refused = trt_unsupported(fused["text"])
    assert refused and all(b.op.startswith("com.microsoft.") for b in refused)
    refusal = r"text graph has \d+ node\(s\) TensorRT 10.15.*com\.microsoft\.MultiHeadAttention"
    with pytest.raises(ExportError, match=refusal):
        require_trt_parsable(fused["text"], what="text graph")
    folded = fold_constants(plain["text"], tmp_path / "text.folded.onnx")
    dynamic = {b.op for b in trt_unsupported(quantize_int8(folded, tmp_path / "text.dyn.onnx"))}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= dynamic
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(1, 100, (2, 6)).astype(np.int64), "attention_mask": np.ones((2, 6), np.int64)}
             for _ in range(4)]
    cal = CalibrationSet(feeds)
    signed = quantize_static_qdq(folded, tmp_path / "text.qdq.onnx", cal)
    assert _ops(signed)["QuantizeLinear"] > 0 and trt_unsupported(signed) == []
    unsigned = trt_unsupported(quantize_static_qdq(folded, tmp_path / "text.qdq.u8.onnx", cal, symmetric=False))
    assert unsigned and all(b.op in ("QuantizeLinear", "DequantizeLinear") and "UINT8" in b.reason for b in unsigned)


def test_trt_check_covers_opset_and_subgraphs():
    from onnx import TensorProto, helper

    from sdk.export.trt_ops import trt_unsupported

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    body = helper.make_graph([helper.make_node("Unique", ["x"], ["u"], name="inner")], "body", [],
                             [helper.make_tensor_value_info("u", TensorProto.FLOAT, [None])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=body, else_branch=body)
    graph = helper.make_graph([node], "g", [cond, x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    bad = trt_unsupported(old)
    assert [b.op for b in bad] == ["opset", "Unique", "Unique"] and bad[1].node == "inner"
    assert "opset 8 outside 9..24" in bad[0].reason
