"""Missing-image completion in the runtime: `Embedder.embed(..., complete_missing="image")`,
`Pipeline(complete_image=True)`, on the tiny split engine plus a tiny completion part (in code)."""

import json

import numpy as np
import pytest

from sdk.errors import EngineError, InvalidInputError

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tiny_completion import engine_with_completion, tiny_completion  # noqa: E402


@pytest.fixture(scope="module")
def completion(tiny_split_engine, tmp_path_factory):
    """(engine path, the torch completion model, its parity report)."""
    model = tiny_completion()
    path, parity = engine_with_completion(tiny_split_engine.path, tmp_path_factory.mktemp("compl"), model)
    return path, model, parity


def photo(seed):
    return np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8)


def items():
    imgs = [photo(0), None, photo(1), None, None]
    texts = ["red shoe", "blue cotton shirt for men", None, "black bag", None]
    traces = [None, None, "casual", "leather", "white dress"]
    return imgs, texts, traces


def test_engine_says_what_it_completes(completion, tiny_split_engine, tiny_engine):
    from sdk import Embedder

    path, _, parity = completion
    assert parity["passed"] and parity["min_cosine"] >= 0.9999
    assert Embedder(path, threads=1).completes == ("image",)
    assert Embedder(tiny_split_engine.path, threads=1).completes == ()
    assert Embedder(tiny_engine.path, threads=1).completes == ()  # single layout: never


def test_default_is_unchanged(completion, tiny_split_engine):
    from sdk import Embedder

    imgs, texts, traces = items()
    want = Embedder(tiny_split_engine.path, threads=1).embed(imgs, texts, traces)
    e = Embedder(completion[0], threads=1)
    np.testing.assert_array_equal(e.embed(imgs, texts, traces), want)
    np.testing.assert_array_equal(e.embed(imgs, texts, traces, complete_missing=None), want)


def test_only_items_with_a_title_and_no_photo_are_completed(completion, tiny_split_engine):
    from sdk import Embedder

    imgs, texts, traces = items()
    plain = Embedder(tiny_split_engine.path, threads=1).embed(imgs, texts, traces)
    got = Embedder(completion[0], threads=1).embed(imgs, texts, traces, complete_missing="image")
    changed = np.abs(got - plain).max(1) > 1e-4
    assert changed.tolist() == [False, True, False, True, False]  # items 1 and 3: title, no photo
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_completed_vectors_match_pytorch(completion, tiny_split_engine):
    from tokenizers import Tokenizer

    from sdk import Embedder
    from sdk.engine import EngineFile

    path, model, _ = completion
    graph = tiny_split_engine.graph
    e = Embedder(path, threads=1)
    tok = Tokenizer.from_str(EngineFile.read(path).part("tokenizer.json").decode())
    texts = ["red shoe", "blue cotton shirt for men and women", "bag"]
    got = e.embed(texts=texts, complete_missing="image")
    for i, t in enumerate(texts):
        ids = torch.tensor([tok.encode(t).ids])
        mask = torch.ones_like(ids, dtype=torch.float32)
        with torch.no_grad():
            states = graph.text_encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            image = model(states, mask)
            present = torch.tensor([[1.0, 1.0, 0.0]])
            want = graph.fusion(None, None, states, mask, torch.zeros(1, 1, 16), torch.zeros(1, 1), present,
                                image_tokens=image).numpy()[0]
        assert float(got[i] @ want) > 0.9999, t


def test_every_entry_point_takes_the_option(completion):
    from sdk import Embedder
    from sdk.pipeline import Pipeline

    e = Embedder(completion[0], threads=1)
    imgs, texts, traces = items()
    want = e.embed(imgs, texts, traces, complete_missing="image")
    np.testing.assert_array_equal(e.embed_batch(imgs, texts, traces, complete_missing="image").vectors, want)
    recs = [{"title": "blue cotton shirt for men"}, {"title": "black bag", "trace": "leather"}]
    np.testing.assert_allclose(e.embed_products(recs, complete_missing="image"), want[[1, 3]], atol=1e-6)
    p = Pipeline(completion[0], complete_image=True, threads=1)
    np.testing.assert_allclose(p.embed(imgs[:2], texts[:2]), e.embed(imgs[:2], texts[:2], complete_missing="image"),
                               atol=1e-6)


def test_bad_requests_raise_precise_errors(completion, tiny_split_engine):
    from sdk import Embedder
    from sdk.pipeline import Pipeline

    e = Embedder(completion[0], threads=1)
    for bad in ("text", "Image", True):
        with pytest.raises(InvalidInputError, match="complete_missing must be one of"):
            e.embed(texts=["red"], complete_missing=bad)
    plain = Embedder(tiny_split_engine.path, threads=1)
    with pytest.raises(EngineError, match="cannot complete a missing image"):
        plain.embed(texts=["red"], complete_missing="image")
    with pytest.raises(EngineError, match="cannot complete a missing image"):
        plain.embed_batch(texts=["red"], complete_missing="image")
    with pytest.raises(EngineError, match="no image completion part"):
        Pipeline(tiny_split_engine.path, complete_image=True, threads=1)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(completes="text"), "completes only 'image'"),
    (lambda s: s.pop("part"), "completion section is unusable"),
    (lambda s: s.update(part="head.npz"), "cannot load part 'head.npz'|not a valid ONNX graph"),
])
def test_a_bad_completion_section_is_refused(completion, tmp_path, edit, match):
    from sdk import Embedder
    from sdk.engine import EngineFile, write_engine

    src = EngineFile.read(completion[0])
    manifest = json.loads(json.dumps(src.manifest))
    edit(manifest["completion"])
    write_engine(tmp_path / "bad.engine", manifest, {n: src.part(n) for n in src.part_names})
    with pytest.raises(EngineError, match=match):
        Embedder(tmp_path / "bad.engine", threads=1)


def test_a_completion_graph_of_the_wrong_width_is_refused(completion, tiny_split_engine, tmp_path):
    from tiny_completion import engine_with_completion

    from sdk import Embedder
    from sdk.train.completion import CompletionConfig, ImageCompletion

    wrong = ImageCompletion(CompletionConfig(d_model=16, text_dim=16, n_tokens=49, n_queries=7, n_heads=4,
                                             n_layers=1, dropout=0.0)).eval()
    path, _ = engine_with_completion(tiny_split_engine.path, tmp_path, wrong)
    with pytest.raises(EngineError, match="the head reads"):
        Embedder(path, threads=1)


def test_cli_shows_the_part_and_build_takes_the_flags(completion, capsys):
    from sdk.cli import build_parser, main

    assert main(["inspect", str(completion[0])]) == 0
    assert "completion: missing image from the title (completion.onnx)" in capsys.readouterr().out
    args = build_parser().parse_args(["build", "--no-completion"])
    assert args.no_completion and args.completion is None
    assert build_parser().parse_args(["build", "--completion", "w"]).completion == "w"
