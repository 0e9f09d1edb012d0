"""FP16 split engines: the conversion keeps normalisation, softmax and the graph edges in FP32, and
the runtime's vectors stay with the FP32 engine's."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.transformers.float16")

from sdk.export.build import BuildConfig  # noqa: E402
from sdk.export.quantize import FP16_KEEP_FP32, convert_fp16  # noqa: E402

F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def fp16_parts(tiny_split_engine, tmp_path_factory):
    from sdk.export.quantize import fold_constants

    tmp = tmp_path_factory.mktemp("fp16")
    parts = tiny_split_engine.parts
    return {name: convert_fp16(fold_constants(parts[name], tmp / f"{name}.folded.onnx"), tmp / f"{name}.fp16.onnx")
            for name in ("image", "text")}


@pytest.mark.parametrize("name", ["image", "text"])
def test_weights_are_fp16_and_the_edges_and_kept_ops_fp32(fp16_parts, name):
    model = onnx.load(str(fp16_parts[name]))
    g = model.graph
    for value in [*g.input, *g.output]:
        assert value.type.tensor_type.elem_type != F16, f"{value.name} should keep its float32/int64 type"
    inits = {t.name: t for t in g.initializer}
    matmul_weights = [inits[i] for n in g.node if n.op_type == "MatMul" for i in n.input if i in inits]
    assert matmul_weights and all(t.data_type == F16 for t in matmul_weights)
    kept = [n for n in g.node if n.op_type in FP16_KEEP_FP32]
    assert kept, "the tiny graphs have LayerNorms and softmaxes"
    for n in kept:  # their weights stay FP32, and so do their inputs (Casts feed them)
        assert all(inits[i].data_type == F32 for i in n.input if i in inits), n.name
    casts = {o for n in g.node if n.op_type == "Cast" for o in n.output}
    assert casts


def test_fp16_engine_embeds_like_the_fp32_one(tiny_split_engine, fp16_parts, tmp_path):
    from PIL import Image

    from sdk.embedder import Embedder
    from sdk.engine import EngineFile
    from sdk.export.bundle import package_split_embedder
    from sdk.preprocess import ImagePreprocess

    src = EngineFile.read(tiny_split_engine.path)
    pre = src.manifest["preprocess"]
    out = package_split_embedder(
        tmp_path / "fp16.engine", fp16_parts["image"].read_bytes(), fp16_parts["text"].read_bytes(),
        tiny_split_engine.parts["head"].read_bytes(), src.part(pre["text"]["tokenizer"]), dim=32,
        matryoshka_dims=(16, 32), precision="fp16", image=ImagePreprocess(size=224),
        text_max_length=pre["text"]["max_length"], trace_max_length=pre["trace"]["max_length"],
    )
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]
    kw = dict(images=[photos[0], None, photos[1], photos[2]], texts=["red cotton shirt", "blue jeans", None, "a bag"])
    got = Embedder(out).embed(**kw)
    want = Embedder(tiny_split_engine.path).embed(**kw)
    assert Embedder(out).precision == "fp16"
    assert (got * want).sum(1).min() >= 0.999


@pytest.mark.parametrize("kw", [{"precision": "fp16", "layout": "single"},
                                {"precision": "auto", "layout": "single", "auto_candidates": ("fp16", "fp32")}])
def test_fp16_needs_the_split_layout(kw):
    with pytest.raises(ValueError, match="need(s)? layout 'split'"):
        BuildConfig(**kw)


def test_fp32_originals_are_found_in_commits_from_before_the_package_moved(tmp_path):
    """`--fp32-rev` names commits from before train/ moved under sdk/: the weights are read where
    that commit kept them (train/weights), and from a later commit where they are now."""
    import subprocess

    from sdk.export.fp16_fidelity import fp32_from_git
    from sdk.paths import REPO, WEIGHTS

    before, after = "2ab5527", "b5434fb"  # the last commit with train/ at the top, the move itself
    if any(subprocess.run(["git", "cat-file", "-e", rev], cwd=REPO, capture_output=True).returncode for rev in
           (before, after)):
        pytest.skip("needs the repository's history (a full clone)")
    for rev in (before, after):
        out = fp32_from_git(rev, WEIGHTS, ["embedder.json"], tmp_path / rev)
        old = subprocess.run(["git", "show", f"{rev}:{'train' if rev == before else 'sdk/train'}/weights/embedder.json"],
                             cwd=REPO, check=True, capture_output=True).stdout
        assert (out / "embedder.json").read_bytes() == old
