"""Split engines: image graph + text graph + NumPy/fused-op head (sdk.head, sdk.export.onnx_split).

The generic runtime behaviour (parity with PyTorch, bad input, batching) runs on both layouts in
test_embedder.py; here is what is particular to the split layout.
"""

import io
import json

import numpy as np
import pytest

from sdk.errors import EngineError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def split(tiny_split_engine):
    from sdk import Embedder

    with Embedder(tiny_split_engine.path, threads=1) as e:
        yield e


class _Counting:
    """An ONNX Runtime session that counts the rows it is run on."""

    def __init__(self, session):
        self.session, self.rows = session, []

    def run(self, names, feed):
        self.rows.append(next(iter(feed.values())).shape[0])
        return self.session.run(names, feed)


def test_export_parity_report(tiny_split_engine):
    p = tiny_split_engine.parity
    assert p["passed"] and p["min_cosine"] >= 0.9999 and p["rows"] == 9
    assert {b["batch"] for b in p["batches"]} == {2, 7}


def test_same_vectors_as_the_single_graph_engine(split, tiny_engine):
    from sdk import Embedder

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (50, 40, 3), dtype=np.uint8), None, rng.integers(0, 255, (30, 60, 3), dtype=np.uint8)]
    texts, traces = ["red shoe", "blue cotton shirt for men", None], [None, "casual", "leather bag"]
    with Embedder(tiny_engine.path, threads=1) as single:
        want = single.embed(images, texts, traces)
    got = split.embed(images, texts, traces)
    assert (got * want).sum(1).min() > 0.9999


def test_each_tower_runs_only_on_items_with_its_modality(tiny_split_engine):
    from sdk import Embedder

    e = Embedder(tiny_split_engine.path, threads=1)
    image = e._runner.image_session = _Counting(e._runner.image_session)
    text = e._runner.text_session = _Counting(e._runner.text_session)
    e.embed(texts=["red shoe", "blue shirt", "black bag"])
    assert image.rows == [] and text.rows == [3]  # text-only: no image tower; no traces: one text run
    img = np.full((20, 20, 3), 128, np.uint8)
    e.embed(images=[img, None, img], texts=[None, "red", None], traces=["cotton", None, None])
    assert image.rows == [2] and text.rows == [3, 1, 1]  # 2 photos; 1 title; 1 trace


def _brute_force_groups(lengths, run_cost):
    """Every way to cut the sorted rows into consecutive groups: the least cost."""
    import itertools

    n, best = len(lengths), None
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = [0, *cuts, n]
            cost = sum((b - a) * lengths[b - 1] + run_cost for a, b in zip(bounds, bounds[1:]))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("run_cost", [0.5, 4, 12, 100])
def test_length_groups_is_the_cheapest_cut(seed, run_cost):
    from sdk.head import length_groups

    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(1, 40, rng.integers(1, 9)))
    groups = length_groups(lengths, run_cost)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a < b for a, b in groups) and all(b == a2 for (_, b), (a2, _) in zip(groups, groups[1:]))
    cost = sum((b - a) * lengths[b - 1] + run_cost for a, b in groups)
    assert cost == pytest.approx(_brute_force_groups(lengths, run_cost))


def test_length_groups_extremes():
    from sdk.head import length_groups

    assert length_groups(np.array([7] * 32)) == [(0, 32)]  # equal lengths: one run
    assert length_groups(np.array([3, 3, 3, 3, 3, 3, 3, 3, 60])) == [(0, 8), (8, 9)]  # one long outlier runs alone
    assert length_groups(np.array([5])) == [(0, 1)]
    assert length_groups(np.array([1, 2, 3]), run_cost=1e9) == [(0, 3)]
    assert length_groups(np.array([], np.int64)) == []


@pytest.mark.parametrize(("lengths", "run_cost", "message"), [
    ([3, 2], 12, "ascending"),
    ([[1, 2]], 12, "1-D"),
    ([-1, 2], 12, ">= 0"),
    ([1, float("nan")], 12, "finite"),
    ([1, 2], -1, "run_cost must be >= 0"),
])
def test_length_groups_refuses_bad_input(lengths, run_cost, message):
    from sdk.head import length_groups

    with pytest.raises(ValueError, match=message):
        length_groups(np.array(lengths), run_cost)


def test_texts_of_very_different_lengths_run_in_length_groups_with_unchanged_vectors(split, tiny_engine):
    """Titles of 3 and 12 tokens in one batch: the text graph runs once per length group (less
    padding), and each vector is what the title gives alone."""
    w = tiny_engine.words
    long = " ".join(w[:tiny_engine.text_max - 2])  # the whole budget, no truncation
    texts = [w[i % len(w)] for i in range(10)]
    texts[3:3] = [long]
    texts.append(" ".join(reversed(long.split())))
    text = split._runner.text_session = _Counting(split._runner.text_session)
    try:
        got = split.embed(texts=texts)
        assert text.rows == [10, 2]  # 10 one-word titles, then the 2 long ones
        alone = np.stack([split.embed(texts=[t])[0] for t in texts])
    finally:
        split._runner.text_session = text.session
    np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5)


def test_head_matches_the_torch_fusion_model(tiny_split_engine):
    torch = pytest.importorskip("torch")
    from sdk.export.onnx_split import head_state
    from sdk.head import FusionHead

    fusion = tiny_split_engine.graph.fusion
    head = FusionHead(head_state(fusion), json.loads(fusion.cfg.to_json()))
    g = torch.Generator().manual_seed(0)
    B, T, S = 4, 6, 3
    deep, shallow = torch.randn(B, 49, 1280, generator=g), torch.randn(B, 49, 152, generator=g)
    text, trace = torch.randn(B, T, 16, generator=g), torch.randn(B, S, 16, generator=g)
    present = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.float32)
    tmask = torch.ones(B, T) * present[:, 1:2]
    tmask[0, 4:] = 0
    smask = torch.ones(B, S) * present[:, 2:3]
    with torch.inference_mode():
        want = fusion(deep, shallow, text, tmask, trace, smask, present).numpy()
        img = fusion.encode_image(deep, shallow).numpy()
    got = head(img, text.numpy(), tmask.numpy(), trace.numpy(), smask.numpy(), present.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # absent modalities' states never reach the result: garbage there changes nothing
    img2, text2 = img.copy(), text.numpy().copy()
    img2[2:] = 1e3
    text2[1] = -1e3
    got2 = head(img2, text2, tmask.numpy(), trace.numpy(), smask.numpy(), present.numpy())
    np.testing.assert_allclose(got2, got, rtol=0, atol=1e-6)
    # a Matryoshka prefix is the re-normalised prefix
    g16 = head(img, text.numpy(), tmask.numpy(), trace.numpy(), smask.numpy(), present.numpy(), dim=16)
    np.testing.assert_allclose(g16, got[:, :16] / np.linalg.norm(got[:, :16], axis=1, keepdims=True), atol=1e-6)


def _head_blob(tiny_split_engine):
    return tiny_split_engine.parts["head"].read_bytes()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "the head weights cannot be read"),
        (lambda b: b"not a zip", "the head weights cannot be read"),
        ("drop:query", "the head weights lack 'query'"),
        ("shape:head.1.bias", "has shape"),
        ("format", "unknown head weights format"),
        ("pickle", "the head weights cannot be read"),
    ],
)
def test_damaged_head_weights_raise_engine_error(tiny_split_engine, damage, message):
    from sdk.head import FusionHead

    blob = _head_blob(tiny_split_engine)
    if callable(damage):
        blob = damage(blob)
    else:
        with np.load(io.BytesIO(blob)) as z:
            arrays = {k: z[k] for k in z.files}
        kind, _, name = damage.partition(":")
        if kind == "drop":
            del arrays[name]
        elif kind == "shape":
            arrays[name] = arrays[name][:-1]
        elif kind == "format":
            meta = json.loads(arrays["__meta__"].tobytes())
            arrays["__meta__"] = np.frombuffer(json.dumps({**meta, "format": 99}).encode(), np.uint8)
        elif kind == "pickle":
            arrays["query"] = np.array([{"x": 1}], dtype=object)  # needs pickle to load: refused
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        blob = buf.getvalue()
    with pytest.raises(EngineError, match=message):
        FusionHead.from_bytes(blob)


def test_unknown_layout_is_refused(tiny_split_engine, tmp_path):
    from sdk import Embedder
    from sdk.engine import EngineFile, write_engine

    src = EngineFile.read(tiny_split_engine.path)
    manifest = json.loads(json.dumps(src.manifest))
    manifest["embedder"]["layout"] = "pipelined"
    parts = {name: src.part(name) for name in ("image.onnx", "text.onnx", "head.npz", "tokenizer.json")}
    write_engine(tmp_path / "x.engine", manifest, parts)
    with pytest.raises(EngineError, match="unknown embedder layout 'pipelined'"):
        Embedder(tmp_path / "x.engine")


def test_swapped_graph_parts_are_refused(tiny_split_engine, tmp_path):
    from sdk import Embedder
    from sdk.engine import EngineFile, write_engine

    src = EngineFile.read(tiny_split_engine.path)
    parts = {name: src.part(name) for name in ("image.onnx", "text.onnx", "head.npz", "tokenizer.json")}
    parts["image.onnx"], parts["text.onnx"] = parts["text.onnx"], parts["image.onnx"]
    write_engine(tmp_path / "x.engine", src.manifest, parts)
    with pytest.raises(EngineError, match="the image graph has inputs"):
        Embedder(tmp_path / "x.engine")
