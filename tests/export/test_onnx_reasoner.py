"""Reasoner export (visual / prefill / decode graphs) and the torch-free runtime generating with them."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tiny_models import tiny_reasoner_export

    return tiny_reasoner_export(tmp_path_factory.mktemp("reasoner"))


def test_greedy_tokens_match_pytorch(exported):
    _, _, _, report = exported
    assert report["passed"] and report["generations"] == 4 and report["mismatches"] == []
    assert report["max_abs_err_logits"] < 1e-3


def test_runtime_decoder_matches_on_other_prompts_and_reports_speed(exported):
    from sdk.export.onnx_tools import ort_session
    from sdk.reasoner import OnnxDecoder

    model, tower, paths, _ = exported
    dec = OnnxDecoder(*(ort_session(paths[k], 1) for k in ("visual", "prefill", "decode")))
    pixels = torch.rand(1, 3, 224, 224) * 2 - 1
    vkv = dec.visual(pixels.numpy())
    with torch.inference_mode():
        deep = tower(pixels)[0][0]
    for prompt in ([1, 7, 8, 9, 3], [1, *range(20, 50), 3]):
        stats = {}
        assert dec.generate(prompt, vkv, 16, stats=stats) == model.generate(prompt, deep, max_new_tokens=16)
        assert dec.generate(prompt, None, 16) == model.generate(prompt, None, max_new_tokens=16)
        assert stats["prompt_tokens"] == len(prompt) and stats["prefill_tokens_per_s"] > 0
    assert dec.generate([1, 3], None, 0) == []


@pytest.fixture(scope="module")
def reasoner_engine(exported, tmp_path_factory):
    from tiny_models import tiny_reasoner_tokenizer

    from sdk.engine import FORMAT_VERSION, write_engine
    from sdk.export.bundle import reasoner_parts
    from sdk.train.reasoner_model import TASKS

    model, _, paths, parity = exported
    tok = tiny_reasoner_tokenizer()
    section, parts = reasoner_parts(paths["visual"].parent, tok.to_str().encode(), tasks=TASKS, max_len=64,
                                    parity=parity)
    path = tmp_path_factory.mktemp("eng") / "r.engine"
    write_engine(path, {"format": "moon3.engine", "format_version": FORMAT_VERSION, "reasoner": section}, parts)
    return path, tok


def test_sdk_reasoner_generates_what_pytorch_generates(exported, reasoner_engine):
    from PIL import Image

    from sdk.preprocess import ImagePreprocess, image_to_array
    from sdk.reasoner import Reasoner
    from sdk.train.reasoner_model import encode_example

    model, tower, _, _ = exported
    path, tok = reasoner_engine
    r = Reasoner(path, threads=1)
    photo = np.random.default_rng(0).integers(0, 255, (60, 40, 3), dtype=np.uint8)
    with torch.inference_mode():
        deep = tower(torch.from_numpy(image_to_array(Image.fromarray(photo), ImagePreprocess())[None]))[0][0]
    for task, text, fields, img in (("caption", None, {}, photo), ("attribute_qa", "red shoe", {"key": "colour"}, None),
                                    ("trace", "blue shirt", {}, photo)):
        ids, _ = encode_example(tok, r.tasks[task].format(**fields), None, text)
        assert r.prompt_ids(task, text, **fields) == ids
        want = model.generate(ids, deep if img is not None else None, max_new_tokens=10)
        got = r.generate(image=img, text=text, task=task, max_new_tokens=10, **fields)
        assert got == r.decode(want)
        assert r.last_stats["new_tokens"] == len(want) and r.last_stats["prompt_tokens"] == len(ids)


def test_sdk_reasoner_bad_input(reasoner_engine, tmp_path):
    from sdk.engine import FORMAT_VERSION, write_engine
    from sdk.errors import EngineError, InvalidInputError
    from sdk.reasoner import Reasoner

    r = Reasoner(reasoner_engine[0], threads=1)
    with pytest.raises(InvalidInputError, match="unknown task 'poem'"):
        r.generate(text="x", task="poem")
    with pytest.raises(InvalidInputError, match="needs key="):
        r.generate(text="x", task="attribute_qa")
    with pytest.raises(InvalidInputError, match="nothing to reason about"):
        r.generate(text="   ", task="caption")
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        r.generate(text="x", max_new_tokens=-1)
    with pytest.raises(InvalidInputError, match="text must be a str"):
        r.generate(text=b"x")
    with pytest.raises(InvalidInputError, match="image"):
        r.generate(image=b"not an image")
    with pytest.raises(InvalidInputError, match="reads at most"):
        r.generate(text="red " * 80)
    assert r.generate(text="red shoe", max_new_tokens=0) == ""
    write_engine(tmp_path / "e.engine", {"format": "moon3.engine", "format_version": FORMAT_VERSION}, {})
    with pytest.raises(EngineError, match="has no reasoner"):
        Reasoner(tmp_path / "e.engine")


def test_reasoner_unknown_or_missing_backend_and_bad_threads(reasoner_engine):
    import onnxruntime as ort

    from sdk.errors import BackendUnavailableError
    from sdk.reasoner import Reasoner
    from sdk.sessions import BACKENDS

    path = reasoner_engine[0]
    with pytest.raises(ValueError, match=r"unknown backend 'rocm'; available: \['cpu', 'cuda', 'tensorrt'\]"):
        Reasoner(path, providers=["rocm"])
    with pytest.raises(ValueError, match=r"threads must be a positive int or None, got 0"):
        Reasoner(path, threads=0)
    r = Reasoner(path, threads=1, providers="cpu")
    assert r.backend == "cpu" and r.providers == ("CPUExecutionProvider",)
    if BACKENDS["tensorrt"].provider not in ort.get_available_providers():
        with pytest.raises(BackendUnavailableError, match=r"backend 'tensorrt' needs TensorrtExecutionProvider.*"
                                                          r"moon3-sdk\[gpu,trt\]"):
            Reasoner(path, providers=["tensorrt", "cpu"])


def test_reasoner_inactive_backend_warns_and_reports_what_runs(reasoner_engine, inactive_cuda):
    """An EP that onnxruntime lists but fails to activate (no CUDA libraries): a visible warning."""
    from sdk.reasoner import Reasoner

    asked = inactive_cuda
    inactive = r"requested backend\(s\) \['cuda'\] are not active.*reasoner runs on 'cpu'"
    with pytest.warns(RuntimeWarning, match=inactive) as rec:
        r = Reasoner(reasoner_engine[0], threads=1, providers=["cuda", "cpu"])
    assert rec[0].filename == __file__  # points at the caller
    assert r.backend == "cpu" and "CUDAExecutionProvider" not in r.providers
    assert asked and all(a == ["CUDAExecutionProvider", "CPUExecutionProvider"] for a in asked)
    assert isinstance(r.generate(text="red shoe", task="category", max_new_tokens=3), str)


def test_cli_reason(reasoner_engine, capsys):
    from sdk.cli import main

    path, _ = reasoner_engine
    assert main(["reason", str(path), "--text", "red shoe", "--task", "category", "--max-new-tokens", "5"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("category ") and "tok/s" in cap.err
    assert main(["reason", str(path), "--text", "red shoe", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in ("caption", "category", "attributes", "trace")) and "attribute_qa" not in out
    assert main(["reason", str(path), "--task", "caption"]) == 2
    assert "nothing to reason about" in capsys.readouterr().err


def test_one_step_graph_serves_prefill_and_decode(exported, reasoner_engine):
    from sdk.engine import EngineFile

    _, _, paths, _ = exported
    assert paths["prefill"] == paths["decode"] and paths["decode"].name == "reasoner_step.onnx"
    spec = EngineFile.read(reasoner_engine[0]).manifest["reasoner"]
    assert spec["parts"]["prefill"] == spec["parts"]["decode"] and spec["precision"] == "fp32"
    assert sorted(p for p in EngineFile.read(reasoner_engine[0]).part_names if p.endswith(".onnx")) == [
        "reasoner_step.onnx", "reasoner_visual.onnx"]


def test_bench_reasoner_reports_prefill_and_decode_speed(reasoner_engine):
    from sdk.bench import bench_reasoner

    rep = bench_reasoner(reasoner_engine[0], ["red shoe", "blue shirt"], rounds=2, warmup=0, threads=1, max_new_tokens=6)
    assert rep["precision"] == "fp32" and rep["prompts"] == 2 and 0 < rep["new_tokens"] <= 12
    assert rep["prefill_tokens_per_s"] > 0 and rep["decode_tokens_per_s"] >= 0
    with pytest.raises(ValueError, match="rounds"):
        bench_reasoner(reasoner_engine[0], ["x"], rounds=0)


class _StackedStep(torch.nn.Module):
    """The step graph of engines before per-layer caches: one cache stacked over layers."""

    def __init__(self, reasoner):
        super().__init__()
        from sdk.export.onnx_reasoner import StepGraph

        self.step = StepGraph(reasoner)
        self.L = reasoner.cfg.n_layers

    def forward(self, input_ids, past_k, past_v, visual_k, visual_v, visual_mask):
        logits, *cache = self.step(input_ids, visual_k, visual_v, visual_mask, [*past_k.unbind(0), *past_v.unbind(0)])
        return logits, torch.stack(cache[: self.L]), torch.stack(cache[self.L :])


class _OldPrefill(torch.nn.Module):
    """The oldest engines' prefill graph: no cache inputs."""

    def __init__(self, reasoner):
        super().__init__()
        self.reasoner = reasoner

    def forward(self, input_ids, visual_k, visual_v, visual_mask):
        logits, cache = self.reasoner(input_ids, visual_mask=visual_mask,
                                      visual_kv=list(zip(visual_k.unbind(0), visual_v.unbind(0))))
        return logits[:, -1], torch.stack([k for k, _ in cache]), torch.stack([v for _, v in cache])


@pytest.mark.parametrize("layout", ["stacked-step", "separate-prefill"])
def test_runtime_still_reads_engines_with_older_cache_layouts(exported, tmp_path, layout):
    """Engines before per-layer caches hold one step graph with a cache stacked over layers; the
    oldest, a prefill graph without cache inputs beside that stacked decode graph."""
    from tiny_models import tiny_reasoner_tokenizer
    from torch.export import Dim

    from sdk.engine import FORMAT_VERSION, write_engine
    from sdk.export.bundle import reasoner_parts
    from sdk.export.onnx_reasoner import STEP_PART
    from sdk.export.onnx_tools import export_module
    from sdk.reasoner import Reasoner
    from sdk.train.reasoner_model import TASKS, encode_example

    model, _, paths, parity = exported
    c = model.cfg
    L, h, hc = c.n_layers, c.n_heads, c.d_model // c.n_heads
    vk = torch.randn(L, 2, h, c.n_visual, hc)
    batch = Dim("batch", min=1)
    seq = Dim("seq", min=1, max=c.max_len)
    vis = {"visual_k": {0: None, 1: batch}, "visual_v": {0: None, 1: batch}, "visual_mask": {0: batch}}
    past = Dim("past", min=1, max=c.max_len - 1)
    pk = torch.randn(L, 2, h, 3, hc)
    export_module(_StackedStep(model).eval(), (torch.randint(6, 300, (2, 5)), pk, pk, vk, vk, torch.tensor([1.0, 0.0])),
                  {"input_ids": {0: batch, 1: seq}, "past_k": {1: batch, 3: past}, "past_v": {1: batch, 3: past}, **vis},
                  ["logits", "present_k", "present_v"], tmp_path / "old_step.onnx", 18)
    tok = tiny_reasoner_tokenizer()
    section, parts = reasoner_parts(paths["visual"].parent, tok.to_str().encode(), tasks=TASKS, max_len=64, parity=parity)
    section = {k: v for k, v in section.items() if k != "precision"}  # older engines had no precision either
    parts[STEP_PART] = (tmp_path / "old_step.onnx").read_bytes()
    if layout == "separate-prefill":
        export_module(_OldPrefill(model).eval(), (torch.randint(6, 300, (2, 5)), vk, vk, torch.tensor([1.0, 0.0])),
                      {"input_ids": {0: batch, 1: seq}, **vis}, ["logits", "present_k", "present_v"],
                      tmp_path / "old_prefill.onnx", 18)
        section["parts"] = {**section["parts"], "prefill": "old_prefill.onnx"}
        parts["old_prefill.onnx"] = (tmp_path / "old_prefill.onnx").read_bytes()
    write_engine(tmp_path / "old.engine", {"format": "moon3.engine", "format_version": FORMAT_VERSION, "reasoner": section},
                 parts)
    r = Reasoner(tmp_path / "old.engine", threads=1)
    assert r.precision == "fp32" and not r._dec._per_layer
    assert r._dec._prefill_past == (layout == "stacked-step")
    ids, _ = encode_example(tok, TASKS["category"], None, "red shoe")
    assert r.generate_ids(text="red shoe", task="category", max_new_tokens=8) == model.generate(ids, None, max_new_tokens=8)


def test_current_step_graph_has_one_cache_input_per_layer(exported):
    import onnx

    from sdk.export.onnx_reasoner import cache_names

    model, _, paths, _ = exported
    g = onnx.load(str(paths["decode"])).graph
    L = model.cfg.n_layers
    assert [i.name for i in g.input] == ["input_ids", "visual_k", "visual_v", "visual_mask", *cache_names(L)]
    assert [o.name for o in g.output] == ["logits", *cache_names(L, "present")]
    assert "Concat" not in {n.op_type for n in g.node}, "no stacking of the cache"
    readers = {i: n.op_type for n in g.node for i in n.input}
    assert all(readers[name] == "MultiHeadAttention" for name in cache_names(L)), "each cache input feeds its attention"
