"""Quantized reasoner graphs (INT4 MatMulNBits, INT8 dynamic), their manifest record, and the reasoner gate."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from sdk.export.reasoner_quant import ReasonerQuantConfig, quantize_reasoner, summarize_graph  # noqa: E402
from sdk.train.eval_reasoner import ReasonerGates, agreement, gate  # noqa: E402

# decoder matmuls with weights per layer: qkv, o, ffn in, ffn out; plus the tied LM head
TINY_LAYERS = 2
STEP_MATMULS = 4 * TINY_LAYERS + 1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tiny_models import tiny_reasoner_export

    return tiny_reasoner_export(tmp_path_factory.mktemp("reasoner"))


def _quantized(exported, tmp_path, **kw):
    _, _, paths, _ = exported
    cfg = ReasonerQuantConfig(**kw)
    record = quantize_reasoner(paths["visual"].parent, tmp_path / cfg.precision, cfg)
    return tmp_path / cfg.precision, record


def _sessions(folder):
    from sdk.export.onnx_tools import ort_session
    from sdk.reasoner import OnnxDecoder

    return OnnxDecoder(ort_session(folder / "reasoner_visual.onnx", 1), ort_session(folder / "reasoner_step.onnx", 1))


def _ops(path):
    return [n for n in onnx.load(str(path)).graph.node]


def test_int4_quantizes_every_weight_matmul_to_matmulnbits(exported, tmp_path):
    folder, record = _quantized(exported, tmp_path, precision="int4", block_size=16, lm_head=True)
    step = record["parts"]["reasoner_step.onnx"]
    assert step["quantized_ops"] == {"MatMulNBits": STEP_MATMULS} and step["fp32_weight_matmuls"] == 0
    nbits = [n for n in _ops(folder / "reasoner_step.onnx") if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 16 and all(n.domain == "com.microsoft" for n in nbits)
    assert attrs["accuracy_level"] == 4  # the default: INT8 activations
    # the embedding lookup keeps its FP32 table; the LM head reads a quantized copy
    assert any(n.op_type == "Gather" for n in _ops(folder / "reasoner_step.onnx"))
    assert record["parts"]["reasoner_visual.onnx"]["quantized_ops"]["MatMulNBits"] >= TINY_LAYERS  # adapters
    assert record["precision"] == "int4" and "MatMulNBitsQuantizer" in record["tool"]


def test_int4_runtime_decodes_close_to_fp32(exported, tmp_path):
    _, _, paths, _ = exported
    folder, _ = _quantized(exported, tmp_path, precision="int4", block_size=16)
    fp32, int4 = _sessions(paths["visual"].parent), _sessions(folder)
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    prompt = [1, *range(20, 40), 3]
    for photo in (True, False):
        want, wl = fp32.generate(prompt, fp32.visual(pixels) if photo else None, 8, return_logits=True)
        got, gl = int4.generate(prompt, int4.visual(pixels) if photo else None, 8, return_logits=True)
        a, b = np.asarray(wl[0], np.float64), np.asarray(gl[0], np.float64)  # first step: same inputs
        assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.97  # random tiny weights: 0.989 measured
        assert got and all(0 <= t < 300 for t in got)


def test_int8_uses_dynamic_integer_matmuls(exported, tmp_path):
    folder, record = _quantized(exported, tmp_path, precision="int8", lm_head=True)
    assert record["parts"]["reasoner_step.onnx"]["quantized_ops"] == {"MatMulInteger": STEP_MATMULS}
    assert record["parts"]["reasoner_step.onnx"]["fp32_weight_matmuls"] == 0
    dec = _sessions(folder)
    assert len(dec.generate([1, 7, 8, 3], None, 5)) <= 5


def test_lm_head_stays_fp32_by_default_sharing_the_embedding_table(exported, tmp_path):
    folder, record = _quantized(exported, tmp_path, precision="int4", block_size=16)
    step = record["parts"]["reasoner_step.onnx"]
    assert step["quantized_ops"] == {"MatMulNBits": STEP_MATMULS - 1} and step["fp32_weight_matmuls"] == 1
    tables = [t for t in onnx.load(str(folder / "reasoner_step.onnx")).graph.initializer
              if list(t.dims) in ([300, 32], [32, 300])]
    assert len(tables) == 1  # one table: the Gather and the head's Transpose read it


def test_fp32_copies_the_graphs(exported, tmp_path):
    folder, record = _quantized(exported, tmp_path, precision="fp32")
    assert record["parts"]["reasoner_step.onnx"]["quantized_ops"] == {}
    assert summarize_graph(folder / "reasoner_step.onnx")["fp32_weight_matmuls"] == STEP_MATMULS


@pytest.mark.parametrize("kw, match", [({"precision": "int3"}, "precision"), ({"block_size": 24}, "block_size"),
                                       ({"block_size": 8}, "block_size"), ({"accuracy_level": 7}, "accuracy_level")])
def test_quant_config_validates(kw, match):
    with pytest.raises(ValueError, match=match):
        ReasonerQuantConfig(**kw)


@pytest.mark.parametrize("kw", [{"max_attribute_f1_drop": -0.1}, {"min_token_agreement": 1.5}])
def test_reasoner_gates_validate(kw):
    with pytest.raises(ValueError):
        ReasonerGates(**kw)


def _engine(folder, record, tmp_path, name):
    from tiny_models import tiny_reasoner_tokenizer

    from sdk.export.bundle import package_reasoner, reasoner_parts
    from sdk.train.reasoner_model import TASKS

    section, parts = reasoner_parts(folder, tiny_reasoner_tokenizer().to_str().encode(), tasks=TASKS, max_len=64,
                                    precision=record["precision"], quantization=record)
    return package_reasoner(tmp_path / f"{name}.engine", section, parts)


def test_manifest_records_precision_per_part_and_runtime_reads_it(exported, tmp_path):
    from sdk.engine import EngineFile
    from sdk.reasoner import Reasoner

    folder, record = _quantized(exported, tmp_path, precision="int4", block_size=32)
    path = _engine(folder, record, tmp_path, "int4")
    spec = EngineFile.read(path).manifest["reasoner"]
    assert spec["precision"] == "int4" and spec["quantization"]["config"]["block_size"] == 32
    assert spec["parts"]["prefill"] == spec["parts"]["decode"] == "reasoner_step.onnx"
    quantized_ops = spec["quantization"]["parts"]["reasoner_step.onnx"]["quantized_ops"]
    assert quantized_ops["MatMulNBits"] == STEP_MATMULS - 1  # all but the FP32 head
    r = Reasoner(path, threads=1)
    assert r.precision == "int4"
    assert isinstance(r.generate(text="red shoe", task="category", max_new_tokens=4), str)


def _records(tmp_path, n=4):
    """Products with a photo file and the catalog fields the metrics read."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        out.append({"id": i * 10, "title": ["red shoe", "blue shirt", "black watch", "red shirt"][i % 4], "image": str(p),
                    "article_type": "Shoes", "base_colour": "Red", "gender": "Men"})
    return out


@pytest.fixture(scope="module")
def broken_engine(exported, tmp_path_factory):
    """A 'quantization' that broke the weights: another model's graphs under the same engine contract."""
    from tiny_models import PooledImageTower

    from sdk.export.onnx_reasoner import ReasonerExportConfig, export_reasoner_onnx
    from sdk.train.reasoner_model import Reasoner as TorchReasoner

    tmp = tmp_path_factory.mktemp("broken")
    torch.manual_seed(5)
    broken = TorchReasoner(exported[0].cfg).eval()
    export_reasoner_onnx(PooledImageTower().eval(), broken,
                         ReasonerExportConfig(tmp / "g", num_threads=1, check_new_tokens=4))
    record = {"precision": "int4", "label": "int4 (broken)", "parts": {}}
    return _engine(tmp / "g", record, tmp, "broken")


def test_gate_passes_identical_engines_and_refuses_a_bad_quantization(exported, broken_engine, tmp_path):
    from sdk.export.gates import GateError
    from sdk.export.reasoner_build import gate_reasoner

    fp32_folder, fp32_record = _quantized(exported, tmp_path, precision="fp32")
    ref = _engine(fp32_folder, fp32_record, tmp_path, "fp32")
    recs = _records(tmp_path)
    quiet = dict(threads=1, log=lambda *_: None)
    same = gate_reasoner(ref, ref, recs, ReasonerGates(min_token_agreement=1.0), label="fp32 copy", **quiet)
    assert same["passed"] and same["agreement"]["exact"] == 1.0 and same["agreement"]["generations"] == 6 * len(recs)
    with pytest.raises(GateError, match=r"int4 \(broken\) reasoner failed its gates .* token agreement") as exc:
        gate_reasoner(ref, broken_engine, recs, ReasonerGates(), label="int4 (broken)", **quiet)
    verdict = exc.value.report
    assert not verdict["passed"] and verdict["agreement"]["tokens"] < 0.8
    json.dumps(verdict)  # goes into the manifest as is
    logged = []
    v = gate_reasoner(ref, broken_engine, recs, ReasonerGates(), label="int4 (broken)", enforce=False, threads=1,
                      log=logged.append)
    assert not v["passed"] and "written anyway" in logged[-1]


def test_gate_names_each_failed_metric():
    ref = {"attribute_f1_photo": 0.5, "attribute_f1_title": 0.45, "category_acc_photo": 0.25, "category_acc_title": 0.27,
           "caption_token_f1": 0.22}
    worse = {**ref, "attribute_f1_title": 0.43, "category_acc_photo": 0.2}
    v = gate(ref, worse, {"generations": 10, "exact": 0.5, "tokens": 0.9}, ReasonerGates())
    assert not v["passed"] and len(v["failed"]) == 2
    assert "attribute F1 drop 0.0200 > 0.01" in v["failed"][0] and "category accuracy drop 0.0500" in v["failed"][1]
    assert v["drop"]["attribute_f1_photo"] == 0.0
    assert gate(ref, ref, {"generations": 10, "exact": 1.0, "tokens": 1.0}, ReasonerGates())["passed"]
    # one product of twenty (5 points) is the measurement's step: it passes; two do not
    ok = {"generations": 20, "exact": 1.0, "tokens": 1.0}
    assert gate(ref, {**ref, "category_acc_title": 0.22}, ok, ReasonerGates(), n_items=20)["passed"]
    v = gate(ref, {**ref, "category_acc_title": 0.17}, ok, ReasonerGates(), n_items=20)
    assert not v["passed"] and "category accuracy drop 0.1000 > 0.05" in v["failed"][0]
    assert not gate(ref, {**ref, "category_acc_title": 0.24}, ok, ReasonerGates(), n_items=150)["passed"]


def test_agreement_counts_tokens_before_the_first_difference():
    ref = {"a": [[1, 2, 3, 4], [5, 6]]}
    got = {"a": [[1, 2, 9, 4], [5, 6]]}
    ag = agreement(got, ref)
    # first: 2 agreeing of 4 + <eos> = 5 positions; second identical: 2 + <eos> of 3
    assert ag["generations"] == 2 and ag["exact"] == 0.5 and ag["tokens"] == pytest.approx((2 + 3) / (5 + 3))


def test_build_config_carries_the_reasoner_options():
    from sdk.export import build

    cfg = build.BuildConfig(reasoner_precision="int8", reasoner_block_size=64, reasoner_lm_head=False,
                            reasoner_gates=ReasonerGates(min_token_agreement=1.0))
    assert cfg.reasoner_quant() == ReasonerQuantConfig("int8", 64, False)
    assert build.BuildConfig().reasoner_quant().label() == "int4 (block 32, LM head fp32, accuracy level 4)"
    for kw, match in (({"reasoner_block_size": 48}, "block_size"), ({"reasoner_precision": "int2"}, "reasoner precision"),
                      ({"reasoner_eval_items": 0}, "reasoner_eval_items")):
        with pytest.raises(ValueError, match=match):
            build.BuildConfig(**kw)


def test_cli_build_validates_reasoner_options(capsys):
    from sdk.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["build", "--reasoner-precision", "int3"])
    assert exc.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    assert main(["build", "--reasoner-block-size", "24"]) == 2
    assert "block_size must be a power of 2 >= 16, got 24" in capsys.readouterr().err
    assert main(["build", "--reasoner-min-token-agreement", "1.5"]) == 2
    assert "min_token_agreement must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_eval_script_measures_engines_against_the_reference(exported, broken_engine, tmp_path, capsys):
    from sdk.train.eval_reasoner import main

    folder, record = _quantized(exported, tmp_path, precision="fp32")
    ref = _engine(folder, record, tmp_path, "fp32")
    cat = tmp_path / "catalog"
    cat.mkdir()
    recs = _records(cat, 3)
    (cat / "items.jsonl").write_text("\n".join(json.dumps({**r, "image": Path(r["image"]).name}) for r in recs))
    out = tmp_path / "report.json"
    args = ["--engine", str(ref), "--reference", str(ref), "--samples", str(cat), "--limit", "3", "--max-new-tokens", "8",
            "--json", str(out)]
    assert main(args) == 0
    rep = json.loads(out.read_text())
    assert rep["items"] == 3 and rep["engines"][str(ref)]["gate"]["agreement"]["exact"] == 1.0
    assert main(["--engine", str(broken_engine), *args[2:]]) == 1
    assert "gates FAILED: token agreement" in capsys.readouterr().out
