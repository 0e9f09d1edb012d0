"""Attribute heads in the engine: saved and loaded as one module, exported as the reasoner visual
graph's "attributes" output (parity with PyTorch), kept FP32 by the reasoner's quantizer, and read
by `sdk.Reasoner` (`read`, and the photo's attribute, category and attribute-QA answers)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

TYPES, COLOURS = ["Shoes", "Tshirts", "Watches"], ["Black", "Blue", "Red"]


def _photos(n, seed):
    """Photos whose dominant channel is their article type: something the tiny tower can see."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, n)
    x = rng.uniform(-1, -0.5, (n, 3, 224, 224)).astype(np.float32)
    for i, k in enumerate(kind):
        x[i, k] += 1.4
    return torch.from_numpy(x), kind


@pytest.fixture(scope="module")
def heads_export(tmp_path_factory):
    from tiny_models import PooledImageTower

    from sdk.export.onnx_reasoner import ReasonerExportConfig, export_reasoner_onnx
    from sdk.export.reasoner_build import load_heads
    from sdk.train.attribute_heads import HEADS_META, HeadConfig, fit, save_heads
    from sdk.train.reasoner_model import Reasoner, ReasonerConfig

    torch.manual_seed(0)
    tower = PooledImageTower().eval()
    pixels, kind = _photos(90, 0)
    with torch.inference_mode():
        feats = tower(pixels)[0].mean(1).numpy()
    rng = np.random.default_rng(1)
    records = [{"article_type": TYPES[k], "base_colour": COLOURS[rng.integers(3)], "gender": "Men",
                "attributes": {"Pattern": "Solid"} if k == 1 else {}} for k in kind]
    heads = fit(feats, records, HeadConfig(hidden=16, epochs=150, min_count=2))
    heads.thresholds = {k: 0.0 for k in heads.classes} | {"colour": 0.999}  # colour: never sure
    folder = save_heads(heads, tmp_path_factory.mktemp("heads"), hidden=16)
    module, record = load_heads(folder, log=lambda *_: None)  # as `moon3 build` loads them
    meta = {**json.loads((folder / HEADS_META).read_text()), "record": record}
    model = Reasoner(ReasonerConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_len=64, n_visual=4,
                                    dropout=0.0)).eval()
    out = tmp_path_factory.mktemp("graphs")
    paths = export_reasoner_onnx(tower, model, ReasonerExportConfig(out, num_threads=1, check_new_tokens=8),
                                 heads=module)
    return heads, feats, module, meta, paths, tower, model


def test_saved_heads_load_as_one_module_with_the_same_probabilities(heads_export):
    heads, feats, module, meta, *_ = heads_export
    assert [f["key"] for f in meta["fields"]] == list(heads.classes) and meta["hidden"] == 16
    want = heads.probabilities(feats)
    with torch.inference_mode():
        got = module(torch.from_numpy(feats)).numpy()
    assert got.shape == (len(feats), sum(len(v) for v in heads.classes.values()))
    np.testing.assert_allclose(got, np.concatenate([want[k] for k in heads.classes], 1), atol=2e-2)  # FP16 storage


def test_the_visual_graph_writes_the_heads_softmaxes_as_pytorch_does(heads_export):
    *_, paths, _, _ = heads_export
    report = json.loads((paths["visual"].parent / "reasoner.parity.json").read_text())
    assert report["passed"] and report["max_abs_err_attributes"] < 1e-4


def test_the_quantizer_keeps_the_heads_fp32_and_nothing_else(heads_export, tmp_path):
    import onnx

    from sdk.export.reasoner_quant import ReasonerQuantConfig, attribute_head_nodes, quantize_graph, summarize_graph

    *_, paths, _, _ = heads_export
    graph = onnx.load(str(paths["visual"]))
    kept = attribute_head_nodes(graph)
    assert len(kept) >= 2  # the trunk and at least one field's layer
    out = quantize_graph(paths["visual"], tmp_path / "v.onnx", ReasonerQuantConfig("int4"), tmp_path)
    assert summarize_graph(out)["quantized_ops"]  # the adapters are INT4
    fp32 = {n.name for n in onnx.load(str(out)).graph.node if n.op_type in ("MatMul", "Gemm")}
    assert set(kept) <= fp32
    assert attribute_head_nodes(onnx.load(str(paths["decode"]))) == []  # the step graph has no heads


@pytest.fixture(scope="module")
def heads_engine(heads_export, tmp_path_factory):
    from tiny_models import tiny_reasoner_tokenizer

    from sdk.engine import FORMAT_VERSION, write_engine
    from sdk.export.bundle import reasoner_parts
    from sdk.train.reasoner_model import TASKS

    *_, meta, paths, _, _ = heads_export
    section, parts = reasoner_parts(paths["visual"].parent, tiny_reasoner_tokenizer().to_str().encode(), tasks=TASKS,
                                    max_len=64, heads=meta["record"])
    path = tmp_path_factory.mktemp("eng") / "r.engine"
    write_engine(path, {"format": "moon3.engine", "format_version": FORMAT_VERSION, "reasoner": section}, parts)
    return path, section


def _uint8(pixels):
    # the runtime's preprocessing maps uint8 HWC to [-1, 1]; feed the tiny tower what the engine feeds
    return np.clip((pixels.permute(1, 2, 0).numpy() + 1) * 127.5, 0, 255).round().astype(np.uint8)


def test_sdk_reasoner_reads_a_photo_with_its_heads(heads_export, heads_engine):
    from sdk.preprocess import ImagePreprocess, image_to_array, load_image
    from sdk.reasoner import Reasoner

    heads, _, module, _, _, tower, _ = heads_export
    r = Reasoner(heads_engine[0], threads=1)
    assert r.heads == tuple(heads.classes)
    pixels, _ = _photos(4, 7)
    for photo in pixels:
        img = _uint8(photo)
        x = torch.from_numpy(image_to_array(load_image(img), ImagePreprocess())[None])
        with torch.inference_mode():
            pooled = tower(x)[0].mean(1).numpy()
        (want,) = heads.predict(pooled)  # the thresholds set above: colour never, the rest always
        got = r.read(img)
        assert [(k, v) for k, (v, _) in got.items()] == want and "colour" not in got
        assert all(0.0 < p <= 1.0 for _, p in got.values())
        assert r.generate(image=img, task="category") == dict(want)["article type"]
        assert r.generate(image=img, task="attributes") == "; ".join(f"{k}: {v}" for k, v in want)
        assert r.last_stats["heads"] is True
        probs = heads.probabilities(pooled)["colour"][0]
        assert r.generate(image=img, task="attribute_qa", key="colour") == heads.classes["colour"][
            int(np.argmax(probs[1:])) + 1]  # asked, the heads name their best colour even when unsure
    # a title alone, and a task the heads do not answer, go through the language model
    r.generate(text="red shoe", task="category")
    assert "heads" not in r.last_stats
    img = _uint8(pixels[0])  # a field the heads do not read: the decoder answers, from the same photo
    got = r.generate_ids(image=img, task="attribute_qa", key="brand", max_new_tokens=6)
    assert "heads" not in r.last_stats
    assert got == r._dec.generate(r.prompt_ids("attribute_qa", key="brand"), r._dec.visual(r._pixels(img)), 6)
    r.generate(image=_uint8(pixels[0]), task="caption", max_new_tokens=4)
    assert "heads" not in r.last_stats


def test_cli_reason_and_inspect_show_the_heads(heads_export, heads_engine, tmp_path, capsys):
    from PIL import Image

    from sdk.cli import main

    heads = heads_export[0]
    pixels, _ = _photos(1, 3)
    Image.fromarray(_uint8(pixels[0])).save(tmp_path / "p.png")
    path = str(heads_engine[0])
    assert main(["reason", path, "--image", str(tmp_path / "p.png"), "--task", "attributes"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("attributes    article type: ") and "attribute heads" in cap.err
    assert main(["inspect", path]) == 0
    assert f"attribute heads: {len(heads.classes)} fields read from the photo" in capsys.readouterr().out


def test_an_engine_without_heads_or_with_the_wrong_width_is_refused(heads_engine, exported_plain, tmp_path):
    from tiny_models import tiny_reasoner_tokenizer

    from sdk.engine import FORMAT_VERSION, write_engine
    from sdk.errors import EngineError
    from sdk.export.bundle import reasoner_parts
    from sdk.reasoner import Reasoner
    from sdk.train.reasoner_model import TASKS

    path, section = heads_engine
    bad = {**section, "heads": {**section["heads"], "fields": section["heads"]["fields"][:-1]}}
    parts = _parts(path)
    wrong = tmp_path / "wrong.engine"
    write_engine(wrong, {"format": "moon3.engine", "format_version": FORMAT_VERSION, "reasoner": bad}, parts)
    with pytest.raises(EngineError, match="attribute probabilities"):
        Reasoner(wrong)
    sec, prt = reasoner_parts(exported_plain, tiny_reasoner_tokenizer().to_str().encode(), tasks=TASKS, max_len=64)
    plain = tmp_path / "plain.engine"
    write_engine(plain, {"format": "moon3.engine", "format_version": FORMAT_VERSION, "reasoner": sec}, prt)
    r = Reasoner(plain)
    assert r.heads == ()
    with pytest.raises(EngineError, match="no attribute heads"):
        r.read(np.zeros((8, 8, 3), np.uint8))
    from sdk.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="image"):
        Reasoner(path).read(b"not an image")


@pytest.fixture(scope="module")
def exported_plain(tmp_path_factory):
    from tiny_models import tiny_reasoner_export

    return tiny_reasoner_export(tmp_path_factory.mktemp("plain"))[2]["visual"].parent


def _parts(path):
    from sdk.engine import EngineFile

    e = EngineFile.read(path)
    return {name: e.part(name) for name in e.part_names}


def test_the_build_finds_the_committed_heads_and_refuses_heads_for_other_features(tmp_path):
    from sdk.export.build_config import BuildConfig
    from sdk.export.onnx_tools import ExportError
    from sdk.export.reasoner_build import load_heads
    from sdk.paths import ATTRIBUTE_HEADS_WEIGHTS
    from sdk.train.attribute_heads import HeadConfig, fit, save_heads

    assert BuildConfig().heads_dir() == ATTRIBUTE_HEADS_WEIGHTS  # committed with the reasoner
    assert BuildConfig(attribute_heads=None).heads_dir() is None
    assert BuildConfig(attribute_heads=tmp_path).heads_dir() == tmp_path
    assert load_heads(None) == (None, None)
    records = [{"article_type": ["Tshirts", "Shoes"][i % 2]} for i in range(20)]
    x = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    save_heads(fit(x, records, HeadConfig(epochs=5, min_count=2)), tmp_path, hidden=0)
    with pytest.raises(ExportError, match=r"\(16 dims\)"):
        load_heads(tmp_path, log=lambda *_: None)
    with pytest.raises(ExportError, match=r"holds no attribute heads \(no heads.json or heads.safetensors\)"):
        load_heads(tmp_path / "nowhere")
