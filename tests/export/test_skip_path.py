"""The embedder's skip path (`EmbedderConfig.skip_path`): linear maps of the towers' pooled
features added to the head's output. The split engine carries it (the image graph gives the
photo's term, the head adds the title's) and computes what the PyTorch model computes."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdk.errors import EngineError  # noqa: E402
from sdk.train.fusion_model import EmbedderConfig, FusionEmbedder  # noqa: E402


def _tiny_graph():
    from tiny_models import PooledImageTower, tiny_bert, tiny_fusion

    from sdk.export.onnx_embedder import EmbedderGraph

    torch.manual_seed(5)
    return EmbedderGraph(PooledImageTower(), tiny_bert(), tiny_fusion(skip_path=True)).eval()


@pytest.fixture(scope="module")
def skip_split(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from sdk.export.onnx_split import SplitExportConfig, export_split_onnx

    folder = tmp_path_factory.mktemp("skip_split")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        graph = _tiny_graph()
        paths = export_split_onnx(graph, SplitExportConfig(folder, num_threads=1, check_batches=((7, 6, 4),)))
    finally:
        torch.set_num_threads(before)
    return graph, paths


def test_zero_skip_path_is_the_model_without_it():
    from tiny_models import tiny_fusion

    torch.manual_seed(0)
    plain = tiny_fusion()
    skip = FusionEmbedder(EmbedderConfig(**{**plain.cfg.__dict__, "skip_path": True})).eval()
    missing, unexpected = skip.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("skip_") for k in missing)
    B = 3
    args = (torch.randn(B, 49, 1280), torch.randn(B, 49, 152), torch.randn(B, 5, 16), torch.ones(B, 5),
            torch.randn(B, 2, 16), torch.ones(B, 2), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    with torch.no_grad():
        torch.testing.assert_close(skip(*args), plain(*args))  # the skip maps start at zero
        skip.skip_image.proj.weight.normal_()
        skip.skip_text.proj.weight.normal_()
        moved = skip(*args)
        assert (moved - plain(*args)).abs().max() > 1e-3
        # image_pooled replaces the mean of img_deep (a rendition's features with the original's tokens)
        tok = skip.encode_image(*args[:2])
        torch.testing.assert_close(skip(*args, image_tokens=tok, image_pooled=args[0].mean(1)), moved)
        assert (skip(*args, image_tokens=tok, image_pooled=torch.zeros(B, 1280)) - moved).abs().max() > 1e-3


def test_the_linear_variant_has_no_skip_path():
    with pytest.raises(ValueError, match="skip_path"):
        EmbedderConfig(variant="linear", skip_path=True)


def test_split_export_carries_the_skip_path(skip_split):
    import onnx

    graph, paths = skip_split
    outs = [o.name for o in onnx.load(str(paths["image"])).graph.output]
    assert outs == ["image_tokens", "image_skip"]
    from sdk.head import FusionHead

    head = FusionHead.from_bytes(paths["head"].read_bytes())
    assert head.skip_path and "skip_text.proj.weight" in head._w and not any(k.startswith("skip_image") for k in head._w)


@pytest.mark.parametrize("presence", [(1, 0, 0), (0, 1, 0), (1, 1, 0), (1, 1, 1), (0, 1, 1)])
def test_split_runner_matches_the_torch_model(skip_split, presence):
    from sdk.contract import INPUT_NAMES
    from sdk.export.onnx_embedder import make_padded_batch
    from sdk.export.onnx_split import split_runner

    graph, paths = skip_split
    feed = make_padded_batch(4, 6, 3, vocab_size=graph.vocab_size, seed=11, presence=[presence] * 4)
    got = split_runner(paths, num_threads=1)(feed)
    with torch.inference_mode():
        want = graph(*(torch.from_numpy(feed[n]) for n in INPUT_NAMES)).float().numpy()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.9999, cos


def test_fused_head_adds_the_skip_term_like_the_reference(skip_split):
    from sdk import ops
    from sdk.head import FusionHead

    if not ops.HAVE_C:
        pytest.skip("sdk._C is not built")
    _, paths = skip_split
    head = FusionHead.from_bytes(paths["head"].read_bytes())
    rng = np.random.default_rng(0)
    B = 5
    image, text = rng.normal(size=(B, 49, head.d)).astype(np.float32), rng.normal(size=(B, 6, 16)).astype(np.float32)
    mask = np.ones((B, 6), np.float32)
    trace, tmask = np.zeros((B, 2, 16), np.float32), np.zeros((B, 2), np.float32)
    present = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]], np.float32)
    mask *= present[:, 1:2]
    image_skip = rng.normal(size=(B, head.out_dim)).astype(np.float32)
    for dim in (16, 32):
        want = head.forward_reference(image, text, mask, trace, tmask, present, dim,
                                      skip=head.skip_term(image_skip, text, mask, present))
        got = head(image, text, mask, trace, tmask, present, dim, image_skip=image_skip)
        np.testing.assert_allclose(got, want, atol=1e-5)
        no_skip = head(image, text, mask, trace, tmask, present, dim, image_skip=np.zeros_like(image_skip))
        assert np.abs(no_skip - got)[present[:, 0] > 0].max() > 1e-3  # the photo's term counts where a photo is
        np.testing.assert_allclose(no_skip[present[:, 0] == 0], got[present[:, 0] == 0], atol=1e-6)
    with pytest.raises(EngineError, match="image_skip has shape"):
        head(image, text, mask, trace, tmask, present, image_skip=image_skip[:, :4])
    with pytest.raises(ValueError, match="skip"):  # the kernel names a wrong per-row term
        head._kernel(image, text, mask, trace, tmask, present, head.out_dim, image_skip[:4])


def test_an_engine_whose_image_graph_lacks_the_skip_output_is_refused(skip_split):
    import onnxruntime as ort

    from sdk.contract import check_split_graphs

    _, paths = skip_split
    image = ort.InferenceSession(str(paths["image"]), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(paths["text"]), providers=["CPUExecutionProvider"])
    check_split_graphs(image, text, paths["image"], 224, skip_path=True)

    class NoSkip:
        def __init__(self, s):
            self.s = s

        def get_inputs(self):
            return self.s.get_inputs()

        def get_outputs(self):
            return [o for o in self.s.get_outputs() if o.name != "image_skip"]

    with pytest.raises(EngineError, match="image_skip"):
        check_split_graphs(NoSkip(image), text, paths["image"], 224, skip_path=True)


def test_split_engine_embeds_like_the_single_graph_engine(skip_split, tiny_engine, tmp_path):
    """Photos, titles and traces in any mix: the split engine (skip term from the image graph and
    the head) gives the vectors of the single-graph engine of the same model."""
    from sdk import Embedder
    from sdk.export.bundle import package_embedder, package_split_embedder
    from sdk.export.onnx_embedder import OnnxExportConfig, export_embedder_onnx
    from sdk.preprocess import ImagePreprocess

    graph, paths = skip_split
    torch.set_num_threads(1)
    onnx_path = export_embedder_onnx(graph, OnnxExportConfig(tmp_path / "single.onnx", exporter="dynamo", num_threads=1,
                                                             check_batches=((2, 5, 3),)))
    opts = dict(dim=32, matryoshka_dims=(16, 32), image=ImagePreprocess(size=224), text_max_length=tiny_engine.text_max,
                trace_max_length=tiny_engine.trace_max)
    tok = tiny_engine.tokenizer.read_bytes()
    single = package_embedder(tmp_path / "single.engine", onnx_path.read_bytes(), tok, **opts)
    split = package_split_embedder(tmp_path / "split.engine", paths["image"].read_bytes(), paths["text"].read_bytes(),
                                   paths["head"].read_bytes(), tok, **opts)
    rng = np.random.default_rng(1)
    img = lambda: rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)  # noqa: E731
    images = [img(), None, img(), img(), None]
    texts = ["red shoe", "blue cotton shirt", None, "leather bag", "watch"]
    traces = [None, "casual", "formal", None, "sports"]
    with Embedder(single, threads=1) as a, Embedder(split, threads=1) as b:
        want, got = a.embed(images, texts, traces), b.embed(images, texts, traces)
        assert (got * want).sum(1).min() > 0.9999
        alone = np.stack([b.embed([im], [t], [s])[0] for im, t, s in zip(images, texts, traces)])
        np.testing.assert_allclose(alone, got, atol=1e-5)


def _with_config(tmp_path, field: str, value: float, presence, single: bool = False) -> dict:
    """The tiny skip-path model with `field` set: the split runtime's vectors (full width and the
    16-d prefix), the PyTorch model's, the PyTorch model's at the field's default, and (single) the
    single-graph export's."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from sdk.contract import INPUT_NAMES
    from sdk.export.onnx_embedder import OnnxExportConfig, export_embedder_onnx, make_padded_batch
    from sdk.export.onnx_split import SplitExportConfig, export_split_onnx, split_runner

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        graph = _tiny_graph()
        default = getattr(graph.fusion.cfg, field)
        setattr(graph.fusion.cfg, field, value)
        b = len(presence)
        paths = export_split_onnx(graph, SplitExportConfig(tmp_path, num_threads=1, check_batches=((b, 6, 4),)))
        feed = make_padded_batch(b, 6, 3, vocab_size=graph.vocab_size, seed=3, presence=presence)
        runner = split_runner(paths, num_threads=1)
        out["got"], out["got16"] = runner(feed), runner(feed, dim=16)
        if single:
            path = export_embedder_onnx(graph, OnnxExportConfig(tmp_path / "single.onnx", exporter="dynamo",
                                                                num_threads=1, check_batches=((b, 6, 4),)))
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out["single"] = sess.run(None, {n: feed[n] for n in INPUT_NAMES})[0]
        with torch.inference_mode():
            args = [torch.from_numpy(feed[n]) for n in INPUT_NAMES]
            out["want"] = graph(*args).float().numpy()
            setattr(graph.fusion.cfg, field, default)
            out["plain"] = graph(*args).float().numpy()
    finally:
        torch.set_num_threads(before)
    return out


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_split_runner_weighs_the_title_like_the_torch_model(tmp_path):
    """`title_weight_with_photo` reaches the engine's head through the exported config: photo +
    title vectors match the PyTorch model's, and differ from the weight-1 model's."""
    v = _with_config(tmp_path, "title_weight_with_photo", 2.5, [(1, 1, 0), (0, 1, 0), (1, 0, 0)])
    assert _cos(v["got"], v["want"]).min() > 0.9999
    assert _cos(v["got"], v["plain"])[0] < 0.9999 and _cos(v["got"], v["plain"])[1:].min() > 0.9999


def test_split_runner_blends_like_the_torch_model(tmp_path):
    """`modality_blend` reaches the engine's head through the exported config: photo + title vectors
    (full width and a Matryoshka prefix) match the PyTorch model's, single-modality ones do not move;
    the single-graph export blends the same way."""
    v = _with_config(tmp_path, "modality_blend", 1.5, [(1, 1, 0), (0, 1, 0), (1, 0, 0), (1, 1, 1)], single=True)
    assert _cos(v["got"], v["want"]).min() > 0.9999 and _cos(v["single"], v["want"]).min() > 0.9999
    assert _cos(v["got16"], v["want"][:, :16]).min() > 0.9999
    assert _cos(v["got"], v["plain"])[[0, 3]].max() < 0.9999 and _cos(v["got"], v["plain"])[1:3].min() > 0.9999


def test_split_runner_blends_the_title_alone_like_the_torch_model(tmp_path):
    """`title_blend` without `modality_blend`: photo + title vectors are normalise(fused + T *
    title-only) in the engine's head and the single graph as in PyTorch."""
    v = _with_config(tmp_path, "title_blend", 2.0, [(1, 1, 0), (0, 1, 0), (1, 0, 0)], single=True)
    assert _cos(v["got"], v["want"]).min() > 0.9999 and _cos(v["single"], v["want"]).min() > 0.9999
    assert _cos(v["got16"], v["want"][:, :16]).min() > 0.9999
    assert _cos(v["got"], v["plain"])[0] < 0.9999 and _cos(v["got"], v["plain"])[1:].min() > 0.9999


@pytest.mark.parametrize("bad, match", [("heavy", "not a number"), (0.0, "finite and > 0"), (float("inf"), "finite")])
def test_a_head_config_with_a_bad_title_weight_is_refused(skip_split, bad, match):
    from sdk.head import FusionHead

    _, paths = skip_split
    head = FusionHead.from_bytes(paths["head"].read_bytes())
    assert head.title_weight_with_photo == 1.0  # exported at the default: the title weighs the same everywhere
    with pytest.raises(EngineError, match=f"title_weight_with_photo.*{match}"):
        FusionHead(head._w, {**head.config, "title_weight_with_photo": bad})


@pytest.mark.parametrize("bad, match", [("much", "not a number"), (-1.0, "finite and >= 0"), (float("nan"), "finite")])
def test_a_head_config_with_a_bad_modality_blend_is_refused(skip_split, bad, match):
    from sdk.head import FusionHead

    _, paths = skip_split
    head = FusionHead.from_bytes(paths["head"].read_bytes())
    assert head.modality_blend == 0.0 and head.title_blend == 0.0
    with pytest.raises(EngineError, match=f"modality_blend.*{match}"):
        FusionHead(head._w, {**head.config, "modality_blend": bad})
    with pytest.raises(EngineError, match=f"title_blend.*{match}"):
        FusionHead(head._w, {**head.config, "title_blend": bad})


def test_a_completed_photo_gets_its_skip_term_in_the_engine_as_in_torch(tmp_path):
    """A skip-path embedder's completion part writes the photo's skip term too; the split runtime
    fuses a title-only row with its completed tokens and that term (blended, for a blended model) as
    `sdk.train.completion.fuse_completed` does, and leaves the other rows alone."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from tiny_completion import tiny_completion

    from sdk.export.onnx_completion import CompletionExportConfig, export_completion_onnx
    from sdk.export.onnx_embedder import make_padded_batch
    from sdk.export.onnx_split import SplitExportConfig, export_split_onnx
    from sdk.export.onnx_tools import ort_session
    from sdk.head import FusionHead, SplitRunner
    from sdk.train.completion import fuse_completed

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        graph = _tiny_graph()
        graph.fusion.cfg.modality_blend = 1.0
        completion = tiny_completion(skip_dim=graph.out_dim)
        paths = export_split_onnx(graph, SplitExportConfig(tmp_path, num_threads=1, check_batches=((3, 6, 4),)))
        cpath = export_completion_onnx(completion, CompletionExportConfig(tmp_path / "c", num_threads=1))
        runner = SplitRunner(ort_session(paths["image"], 1), ort_session(paths["text"], 1),
                             FusionHead.from_bytes(paths["head"].read_bytes()), ort_session(cpath, 1))
        feed = make_padded_batch(3, 6, 3, vocab_size=graph.vocab_size, seed=4,
                                 presence=[(0, 1, 0), (1, 1, 0), (0, 1, 0)])
        got, plain = runner(feed, complete_image=True), runner(feed)
        with torch.inference_mode():
            ids, mask = (torch.from_numpy(feed[n]) for n in ("input_ids", "attention_mask"))
            states = graph.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            want = fuse_completed(graph.fusion, completion, states, mask.float()).numpy()
    finally:
        torch.set_num_threads(before)
    cos = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # noqa: E731
    assert cos(got[[0, 2]], want[[0, 2]]).min() > 0.9999
    np.testing.assert_allclose(got[1], plain[1], atol=1e-6)  # a real photo is not completed
    assert cos(got[[0, 2]], plain[[0, 2]]).max() < 0.9999
