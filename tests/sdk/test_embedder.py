"""sdk.Embedder on a tiny engine built in code: parity with the PyTorch graph, batching and order
invariance, Matryoshka widths, per-item error reporting, backends, threads, damaged engines."""

import io
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pictures import gradient

from sdk.engine import EngineFile, write_engine
from sdk.errors import BackendUnavailableError, BatchError, EngineError, InvalidInputError, SdkError, TruncationWarning
from sdk.ops import l2_normalize
from sdk.preprocess import ImagePreprocess, TextTokenizer, image_to_array, load_image

ort = pytest.importorskip("onnxruntime")

TEXTS = ["red shoe", "blue cotton shirt for men", "black leather bag", "white running shoes and the watch",
         "dress", "casual sport shirt women"]
TRACES = ["red sport shoe for running", None, "   ", "leather and cotton", None, "white"]


def photo(seed: int, h: int = 60, w: int = 45) -> np.ndarray:
    return gradient(seed, h, w)


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def torch_embed(eng, images=None, texts=None, traces=None) -> np.ndarray:
    """The PyTorch graph on the teacher's inputs: zero pixels / tokenized "" with presence 0 when absent."""
    import torch

    n = len(next(c for c in (images, texts, traces) if c is not None))
    images, texts, traces = (c if c is not None else [None] * n for c in (images, texts, traces))
    cfg = ImagePreprocess()
    pix = np.zeros((n, 3, 224, 224), np.float32)
    present = np.zeros((n, 3), np.float32)
    for i, src in enumerate(images):
        if src is not None:
            pix[i] = image_to_array(load_image(src), cfg)
            present[i, 0] = 1
    texts = [t if t and t.strip() else None for t in texts]
    traces = [t if t and t.strip() else None for t in traces]
    present[:, 1] = [t is not None for t in texts]
    present[:, 2] = [t is not None for t in traces]
    ids, mask = TextTokenizer(eng.tokenizer, eng.text_max)([t or "" for t in texts])
    tids, tmask = TextTokenizer(eng.tokenizer, eng.trace_max)([t or "" for t in traces])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            out = eng.graph(*(torch.from_numpy(a) for a in (pix, ids, mask, tids, tmask, present)))
    finally:
        torch.set_num_threads(before)
    return out.numpy()


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module", params=["single", "split"])
def emb(request, tiny_engine):
    """The runtime on the tiny engine, in both layouts (one graph; towers + NumPy/fused head)."""
    from sdk import Embedder

    engine = tiny_engine if request.param == "single" else request.getfixturevalue("tiny_split_engine")
    with Embedder(engine.path, threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    """Six images, one per accepted source kind (array, PNG bytes, JPEG path, PIL, ...)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("imgs")
    arrays = [photo(s, 40 + 7 * s, 30 + 5 * s) for s in range(6)]
    path = folder / "p2.jpg"
    path.write_bytes(encode(arrays[2], "JPEG"))
    return [arrays[0], encode(arrays[1]), path, Image.fromarray(arrays[3]), str(path), arrays[5]]


# ------------------------------------------------------------------ parity and invariance


@pytest.mark.parametrize("kind", ["image", "text", "image+text", "image+text+trace", "text+trace", "trace"])
def test_vectors_match_the_pytorch_graph(emb, tiny_engine, imgs, kind):
    kw = {}
    if "image" in kind:
        kw["images"] = imgs
    if "text" in kind:
        kw["texts"] = TEXTS
    if "trace" in kind:
        kw["traces"] = ["red sport shoe for running", "blue", "leather and cotton", "x", "white dress", "men"]
    got = emb.embed(**kw)
    want = torch_embed(tiny_engine, **kw)
    assert got.shape == (6, 32) and got.dtype == np.float32
    assert cosine(got, want).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_mixed_presence_matches_the_teacher_semantics(emb, tiny_engine, imgs):
    images = [imgs[0], None, imgs[2], None, imgs[4], imgs[5]]
    texts = [None, "blue shirt", "", "black bag", "   ", "dress"]
    got = emb.embed(images, texts, TRACES)
    assert cosine(got, torch_embed(tiny_engine, images, texts, TRACES)).min() > 0.9999
    # absent = None = empty = whitespace
    np.testing.assert_array_equal(emb.embed([imgs[0]], ["  "], [""]), emb.embed([imgs[0]]))


def test_image_sources_give_the_same_vector(emb, imgs, tmp_path):
    arr = photo(9)
    path = tmp_path / "x.png"
    path.write_bytes(encode(arr))
    from PIL import Image

    v = emb.embed([arr, encode(arr), path, str(path), Image.fromarray(arr)])
    np.testing.assert_allclose(v, np.repeat(v[:1], 5, 0), atol=1e-6)
    # one (N, H, W, C) uint8 array is N images
    np.testing.assert_allclose(emb.embed(np.stack([arr, arr])), v[:2], atol=1e-6)


def _many_items(imgs, words):
    rng = np.random.default_rng(0)
    n = 23
    texts = [" ".join(rng.choice(words, rng.integers(1, 9))) if k % 5 else None for k in range(n)]
    traces = [" ".join(rng.choice(words, rng.integers(1, 13))) if k % 3 else None for k in range(n)]
    images = [imgs[k % 6] if k % 4 else None for k in range(n)]
    images[0] = imgs[0]
    return images, texts, traces


def test_batch_size_and_item_order_do_not_change_vectors(emb, tiny_engine, imgs):
    images, texts, traces = _many_items(imgs, tiny_engine.words)
    base = emb.embed(images, texts, traces, batch_size=32)
    assert cosine(base, torch_embed(tiny_engine, images, texts, traces)).min() > 0.9999
    for bs in (1, 3, 7):
        np.testing.assert_allclose(emb.embed(images, texts, traces, batch_size=bs), base, atol=2e-6)
    perm = np.random.default_rng(1).permutation(len(texts))
    shuffled = emb.embed([images[i] for i in perm], [texts[i] for i in perm], [traces[i] for i in perm], batch_size=4)
    np.testing.assert_allclose(shuffled, base[perm], atol=2e-6)


class _Recorder:
    """Wraps the session and records the (text_len, trace_len) of every batch."""

    def __init__(self, session):
        self.session, self.shapes = session, []

    def run(self, names, feed):
        self.shapes.append((feed["input_ids"].shape, feed["trace_ids"].shape))
        return self.session.run(names, feed)


def test_length_bucketing_pads_little(tiny_engine):
    from sdk import Embedder

    e = Embedder(tiny_engine.path, threads=1)
    e._runner.session = rec = _Recorder(e._runner.session)
    short, long = "red", "red blue black white shoe shirt running cotton"  # 3 and 10 tokens
    texts = [short, long] * 4
    v = e.embed(texts=texts, batch_size=4)
    # sorted by length: the short ones share a batch padded to 3, the long ones one padded to 10
    assert sorted(s[0] for s in rec.shapes) == [(4, 3), (4, 10)]
    np.testing.assert_allclose(v[0::2], np.repeat(v[:1], 4, 0), atol=1e-6)
    np.testing.assert_allclose(v[1::2], np.repeat(v[1:2], 4, 0), atol=1e-6)


def test_matryoshka_prefixes(emb, imgs):
    assert emb.dim == 32 and emb.matryoshka_dims == (16, 32)
    assert emb.precision == "fp32" and emb.backend == "cpu" and "CPUExecutionProvider" in emb.providers
    full = emb.embed(imgs[:3], TEXTS[:3])
    for d in (16, 5, 1):
        v = emb.embed(imgs[:3], TEXTS[:3], dim=d)
        assert v.shape == (3, d)
        np.testing.assert_allclose(v, l2_normalize(full, d), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb.embed(imgs[:3], TEXTS[:3], dim=32), full)
    for bad in (0, 33, -1, 1.5, True, "16"):
        with pytest.raises(InvalidInputError, match=r"dim must be"):
            emb.embed(texts=["red"], dim=bad)


def test_manifest_is_a_copy(emb):
    m = emb.manifest
    assert m["embedder"]["dim"] == 32 and m["preprocess"]["text"]["max_length"] == 12
    m["embedder"]["dim"] = 1
    assert emb.manifest["embedder"]["dim"] == 32


def test_truncation_is_reported(emb):
    words = "red blue black white shoe shirt running cotton men women sport casual leather"  # 13 words
    fits = " ".join(words.split()[:10])  # [CLS] + 10 + [SEP] = TEXT_MAX tokens exactly
    with pytest.warns(TruncationWarning, match=r"1 of 2 item\(s\) were truncated .*text 12, trace 16 tokens.*\[1\]"):
        v = emb.embed(texts=[fits, words])
    np.testing.assert_allclose(v[1], v[0], atol=1e-6)  # the cut text is its first TEXT_MAX tokens
    res = emb.embed_batch(texts=[fits, words], traces=[words * 2, None])  # no warning from embed_batch
    assert res.truncated == {0: ("trace",), 1: ("text",)} and res.errors == {}


# ------------------------------------------------------------------ bad items


@pytest.fixture(scope="module")
def bad_cases(imgs, tmp_path_factory):
    jpeg = encode(photo(7, 64, 64), "JPEG")
    missing = tmp_path_factory.mktemp("missing") / "nope.jpg"
    return {
        "missing file": ({"images": [imgs[0], missing, imgs[2]]}, r"item 1 image: file not found: .*nope\.jpg"),
        "corrupt bytes": ({"images": [imgs[0], jpeg[: len(jpeg) // 2], imgs[2]]},
                          r"item 1 image: corrupt or truncated image"),
        "non-image bytes": ({"images": [imgs[0], b"hello, not an image", imgs[2]]},
                            r"item 1 image: not a recognised image format"),
        "empty bytes": ({"images": [imgs[0], b"", imgs[2]]}, r"item 1 image: empty bytes"),
        "empty text, no image": ({"texts": ["red", "  ", "blue"]},
                                 r"item 1: nothing to embed \(no image, text is empty/whitespace, no trace\)"),
        "None item": ({"images": [imgs[0], None, imgs[2]], "texts": ["red", None, "blue"]},
                      r"item 1: nothing to embed \(no image, no text, no trace\); give at least one modality"),
        "text not str": ({"texts": ["red", 42, "blue"]}, r"item 1: text must be a str or None, got int"),
        "trace not str": ({"texts": ["red", "shoe", "blue"], "traces": [None, b"bytes", None]},
                          r"item 1: trace must be a str or None, got bytes"),
        "image wrong type": ({"images": [imgs[0], 3.5, imgs[2]]}, r"item 1 image: unsupported image type float"),
        "NaN float array": ({"images": [imgs[0], np.full((8, 8, 3), np.nan), imgs[2]]},
                            r"item 1 image: array dtype must be uint8 \(0\.\.255\), got float64"),
        "wrong array shape": ({"images": [imgs[0], np.zeros((3, 8, 8), np.uint8), imgs[2]]},
                              r"item 1 image: array must be HxW.*got shape \(3, 8, 8\)"),
    }


BAD = ["missing file", "corrupt bytes", "non-image bytes", "empty bytes", "empty text, no image", "None item",
       "text not str", "trace not str", "image wrong type", "NaN float array", "wrong array shape"]


@pytest.mark.parametrize("case", BAD)
def test_bad_item_is_reported_and_good_items_come_back(emb, bad_cases, case):
    kw, pattern = bad_cases[case]
    res = emb.embed_batch(**kw)
    assert list(res.errors) == [1]
    assert re.search(pattern, res.errors[1]), res.errors[1]
    assert np.isnan(res.vectors[1]).all() and res.ok.tolist() == [True, False, True]
    for i in (0, 2):  # each good item equals embedding it alone
        alone = emb.embed(**{k: [v[i]] for k, v in kw.items()})
        np.testing.assert_allclose(res.vectors[i], alone[0], atol=2e-6)
    with pytest.raises(BatchError, match=r"1 of 3 item\(s\) could not be embedded: " + pattern) as info:
        emb.embed(**kw)
    assert info.value.errors == res.errors
    np.testing.assert_array_equal(info.value.vectors, res.vectors)
    assert info.value.ok.tolist() == [True, False, True]
    with pytest.raises(InvalidInputError, match=pattern) as info:
        emb.embed(**kw, errors="raise")
    assert not isinstance(info.value, BatchError)


def test_every_bad_item_is_reported_by_index(emb, imgs, tmp_path):
    images = [imgs[0], b"junk", None, imgs[3], tmp_path / "gone.png", None, imgs[5]]
    texts = ["red", "shoe", None, 7, None, "  ", "blue"]
    res = emb.embed_batch(images, texts, batch_size=2)
    assert sorted(res.errors) == [1, 2, 3, 4, 5]
    assert res.errors[1].startswith("item 1 image: not a recognised")
    assert res.errors[2].startswith("item 2: nothing to embed")
    assert res.errors[3] == "item 3: text must be a str or None, got int"
    assert res.errors[4].startswith("item 4 image: file not found")
    assert res.errors[5].startswith("item 5: nothing to embed")
    assert res.ok.tolist() == [True, False, False, False, False, False, True]
    np.testing.assert_allclose(res.vectors[[0, 6]], emb.embed([imgs[0], imgs[5]], ["red", "blue"]), atol=2e-6)
    with pytest.raises(BatchError, match=r"5 of 7 item\(s\) .*item 1 image.*item 2.*item 3.*item 4.*item 5") as info:
        emb.embed(images, texts)
    assert sorted(info.value.errors) == [1, 2, 3, 4, 5]
    # errors="raise": the first bad item by index among the cheap checks (the text of item 3
    # is checked before any image is decoded; item 2 has nothing at all)
    with pytest.raises(InvalidInputError, match=r"^item 2: nothing to embed"):
        emb.embed(images, texts, errors="raise")


def test_pixel_buffer_is_reused_and_leaks_nothing(emb, imgs, monkeypatch):
    """Photos decode into one buffer per thread; rows of a batch with missing or bad photos, and
    later calls, get exactly the vectors of items embedded one at a time."""
    import sdk.embedder as embedder

    one_by_one = np.stack([emb.embed([im], ["red"])[0] for im in imgs[:4]])
    text_only = emb.embed(texts=["red"])[0]
    first = emb.embed(imgs[:4], ["red"] * 4)
    buf = emb._buffers.pixels
    np.testing.assert_allclose(first, one_by_one, atol=2e-6)
    # a bad photo and a missing one between good ones: the rows after them shift up in the buffer
    res = emb.embed_batch([imgs[0], b"junk", None, imgs[1], imgs[2]], ["red"] * 5, batch_size=5)
    assert emb._buffers.pixels is buf and sorted(res.errors) == [1]
    np.testing.assert_allclose(res.vectors[[0, 3, 4]], one_by_one[:3], atol=2e-6)
    np.testing.assert_allclose(res.vectors[2], text_only, atol=2e-6)  # its row held a photo before
    # batches above PIXEL_BUFFER_ROWS get a fresh array and leave the kept buffer alone
    monkeypatch.setattr(embedder, "PIXEL_BUFFER_ROWS", 2)
    np.testing.assert_allclose(emb.embed(imgs[:4], ["red"] * 4), one_by_one, atol=2e-6)
    assert emb._buffers.pixels is buf


def test_pixel_buffers_are_per_thread_and_only_for_photos(tiny_split_engine, imgs):
    import threading

    from sdk import Embedder

    with Embedder(tiny_split_engine.path, threads=1) as emb:
        emb.embed(texts=["red", "blue"])
        assert getattr(emb._buffers, "pixels", None) is None  # a batch without photos takes none
        mine = emb.embed(imgs[:2], ["red", "blue"])
        other = {}

        def work():
            other["v"] = emb.embed(imgs[:2], ["red", "blue"])
            other["buf"] = emb._buffers.pixels

        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert other["buf"] is not emb._buffers.pixels  # each thread its own
        np.testing.assert_array_equal(other["v"], mine)
        emb.close()
        assert getattr(emb._buffers, "pixels", None) is None  # close() lets them go


def test_call_level_errors(emb, imgs):
    with pytest.raises(InvalidInputError, match=r"one entry per item, got images 2, texts 3"):
        emb.embed(imgs[:2], ["a", "b", "c"])
    with pytest.raises(InvalidInputError, match=r"texts must be a sequence .* got a single str; wrap it in a list"):
        emb.embed(texts="red shoe")
    with pytest.raises(InvalidInputError, match=r"images must be .* got an array of shape \(40, 30, 3\)"):
        emb.embed(imgs[0])
    with pytest.raises(InvalidInputError, match=r"got a single image"):
        emb.embed(imgs[3])
    with pytest.raises(InvalidInputError, match=r"batch_size must be a positive int, got 0"):
        emb.embed(texts=["red"], batch_size=0)
    with pytest.raises(ValueError, match=r"errors must be one of \('report', 'raise'\), got 'ignore'"):
        emb.embed(texts=["red"], errors="ignore")
    assert emb.embed().shape == (0, 32) and emb.embed(texts=[]).shape == (0, 32)


def test_embed_products(emb, tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(photo(1)).save(tmp_path / "images" / "1.jpg")
    Image.fromarray(photo(2)).save(tmp_path / "images" / "2.jpg")
    records = [
        {"id": 1, "title": "red shoe", "image": "images/1.jpg"},
        {"id": 2, "title": "blue shirt", "image": "images/missing.jpg"},
        "not a record",
        {"id": 4, "title": None},
        {"id": 5, "title": "black bag", "image": "images/2.jpg", "trace": "leather"},
        {"id": 6, "title": "white dress", "image": ""},
        {"id": 7, "title": 3, "image": "images/1.jpg"},
    ]
    with pytest.raises(BatchError) as info:
        emb.embed_products(records, root=tmp_path)
    errs = info.value.errors
    assert sorted(errs) == [1, 2, 3, 6]
    assert errs[1].startswith("record 1 image: file not found") and "missing.jpg" in errs[1]
    assert errs[2] == "record 2: is a str, expected a dict with 'title' and optional 'image'"
    assert errs[3] == "record 3: nothing to embed (no image, no title, no trace); give at least one modality"
    assert errs[6] == "record 6: title must be a str or None, got int"
    want = emb.embed([tmp_path / "images/1.jpg", tmp_path / "images/2.jpg", None],
                     ["red shoe", "black bag", "white dress"], [None, "leather", None])
    np.testing.assert_allclose(info.value.vectors[[0, 4, 5]], want, atol=2e-6)
    good = emb.embed_products([records[0], records[4]], root=tmp_path, dim=16)
    np.testing.assert_allclose(good, l2_normalize(want[:2], 16), atol=2e-6)
    # errors="raise": the record checks run before any image is decoded, so record 2 is met first
    with pytest.raises(InvalidInputError, match=r"^record 2: is a str"):
        emb.embed_products(records, root=tmp_path, errors="raise")
    with pytest.raises(InvalidInputError, match=r"^record 1 image: file not found"):
        emb.embed_products(records[:2], root=tmp_path, errors="raise")


# ------------------------------------------------------------------ backends, threads, lifecycle


def test_unknown_backend_lists_the_available_ones(tiny_engine):
    from sdk import Embedder

    with pytest.raises(ValueError, match=r"unknown backend 'rocm'; available: \['cpu', 'cuda', 'tensorrt'\]"):
        Embedder(tiny_engine.path, providers=["rocm"])
    with pytest.raises(ValueError, match=r"threads must be a positive int"):
        Embedder(tiny_engine.path, threads=0)


@pytest.mark.parametrize("name, extra", [("tensorrt", r"moon3-sdk\[gpu,trt\]"), ("cuda", r"moon3-sdk\[gpu\]")])
def test_backend_missing_from_this_onnxruntime_names_the_extra(tiny_engine, name, extra):
    from sdk import Embedder
    from sdk.sessions import BACKENDS, available_backends

    if BACKENDS[name].provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has {BACKENDS[name].provider}")
    assert name not in available_backends() and "cpu" in available_backends()
    with pytest.raises(BackendUnavailableError, match=rf"backend '{name}' needs {BACKENDS[name].provider}.*{extra}"):
        Embedder(tiny_engine.path, providers=[name, "cpu"])


def test_inactive_backend_warns_and_reports_what_runs(tiny_engine, inactive_cuda):
    """An EP that onnxruntime lists but fails to activate (no CUDA libraries): a visible warning."""
    from sdk import Embedder

    with pytest.warns(RuntimeWarning, match=r"requested backend\(s\) \['cuda'\] are not active.*runs on 'cpu'") as rec:
        e = Embedder(tiny_engine.path, providers=["cuda", "cpu"], threads=1)
    assert rec[0].filename == __file__  # points at the caller
    assert e.backend == "cpu" and "CUDAExecutionProvider" not in e.providers
    assert inactive_cuda and all(a == ["CUDAExecutionProvider", "CPUExecutionProvider"] for a in inactive_cuda)
    assert e.embed(texts=["red"]).shape == (1, 32)


def test_threads_share_one_embedder(tiny_engine, imgs):
    from sdk import Embedder

    e = Embedder(tiny_engine.path, threads=2)
    images, texts, traces = _many_items(imgs, tiny_engine.words)
    want = e.embed(images, texts, traces, batch_size=5)
    start = threading.Barrier(8)

    def work(k):
        start.wait()
        return [e.embed(images, texts, traces, batch_size=5) for _ in range(2)]

    with ThreadPoolExecutor(8) as pool:
        results = [v for vs in pool.map(work, range(8)) for v in vs]
    for got in results:
        np.testing.assert_array_equal(got, want)


def test_closed_embedder_and_context_manager(tiny_engine):
    from sdk import Embedder

    with Embedder(tiny_engine.path, threads=1) as e:
        assert e.embed(texts=["red"]).shape == (1, 32)
        assert "dim=32" in repr(e)
    with pytest.raises(SdkError, match="is closed"):
        e.embed(texts=["red"])


def test_runtime_stays_light(tiny_engine):
    """`import sdk` loads neither onnxruntime nor torch; embedding with an engine never loads torch."""
    code = (
        "import sys, sdk\n"
        "assert 'Embedder' in sdk.__all__\n"
        "light = [m for m in ('torch', 'onnxruntime', 'tensorrt') if m in sys.modules]\n"
        "E = sdk.Embedder\n"
        "light += [m for m in ('torch', 'onnxruntime') if m in sys.modules]\n"
        "v = E(sys.argv[1], threads=1).embed(texts=['red shoe'])\n"
        "print(','.join(light), v.shape, 'torch' in sys.modules, 'onnxruntime' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_engine.path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(1,", "32)", "False", "True"]


# ------------------------------------------------------------------ damaged engines


def _rewrite(src, dst, manifest=None, **parts):
    e = EngineFile.read(src)
    m = e.manifest if manifest is None else manifest(e.manifest)
    return write_engine(dst, m, {n: parts.get(n.replace(".", "_"), e.part(n)) for n in e.part_names})


def _edit(key, value):
    return lambda m: {**m, "embedder": {**m["embedder"], key: value}}


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", r"engine file not found"),
        ("flipped byte", r"checksum mismatch in part 'embedder\.onnx'"),
        ("truncated", r"truncated"),
        ("no embedder section", r"no usable embedder section \(KeyError: 'embedder'\)"),
        ("garbage graph", r"onnxruntime .* cannot load part 'embedder\.onnx'"),
        ("garbage tokenizer", r"tokenizer part 'tokenizer\.json' cannot be loaded"),
        ("wrong dim", r"the graph's output is 32 wide, the manifest says dim 64"),
        ("inconsistent dims", r"inconsistent embedder dims: dim 32, matryoshka_dims \[16, 24\]"),
        ("other inputs", r"takes inputs \['ids', 'pixels'\]; this sdk feeds \['pixels', 'input_ids'"),
        ("missing part", r"engine has no part 'model\.onnx'"),
    ],
)
def test_damaged_engines_raise_engine_error(tiny_engine, tmp_path, damage, message):
    from sdk import Embedder

    src, dst = tiny_engine.path, tmp_path / "bad.engine"
    if damage == "missing":
        dst = tmp_path / "none.engine"
    elif damage in ("flipped byte", "truncated"):
        raw = bytearray(src.read_bytes())
        if damage == "flipped byte":
            raw[len(raw) // 2] ^= 0xFF  # inside the ONNX part (it dwarfs the tokenizer)
        else:
            raw = raw[:-100]
        dst.write_bytes(bytes(raw))
    elif damage == "no embedder section":
        _rewrite(src, dst, lambda m: {k: v for k, v in m.items() if k != "embedder"})
    elif damage == "garbage graph":
        _rewrite(src, dst, embedder_onnx=b"\x08\x07not an onnx graph")
    elif damage == "garbage tokenizer":
        _rewrite(src, dst, tokenizer_json=b'{"model": 3}')
    elif damage == "wrong dim":
        _rewrite(src, dst, lambda m: _edit("matryoshka_dims", [16, 64])(_edit("dim", 64)(m)))
    elif damage == "inconsistent dims":
        _rewrite(src, dst, _edit("matryoshka_dims", [16, 24]))
    elif damage == "other inputs":
        _rewrite(src, dst, _edit("inputs", {"pixels": {}, "ids": {}}))
    elif damage == "missing part":
        _rewrite(src, dst, _edit("part", "model.onnx"))
    with pytest.raises(EngineError, match=message):
        Embedder(dst)


class _Broken:
    """A session whose output row 0 is NaN, or that fails outright."""

    def __init__(self, session, fail=False):
        self.session, self.fail = session, fail

    def run(self, names, feed):
        if self.fail:
            raise RuntimeError("simulated kernel failure")
        out = self.session.run(names, feed)[0].copy()
        out[0] = np.nan
        return [out]


def test_engine_output_problems_are_not_silent(tiny_engine):
    from sdk import Embedder

    e = Embedder(tiny_engine.path, threads=1)
    real = e._runner.session
    e._runner.session = _Broken(real)
    res = e.embed_batch(texts=["red", "blue"], dim=16)  # one batch, sorted: "red" is row 0
    assert list(res.errors) == [0] and "item 0: the engine produced a non-finite vector" in res.errors[0]
    assert np.isnan(res.vectors[0]).all() and np.isfinite(res.vectors[1]).all()
    e._runner.session = _Broken(real, fail=True)
    with pytest.raises(EngineError, match=r"the embedder graph failed on inputs .*simulated kernel failure"):
        e.embed(texts=["red"])


def test_cpu_sessions_turn_off_the_slow_skip_layernorm_fusion():
    from sdk.sessions import session_kwargs

    assert session_kwargs(["CPUExecutionProvider"]) == {"disabled_optimizers": ["SkipLayerNormFusion"]}
    assert session_kwargs("CPUExecutionProvider") == session_kwargs(("CPUExecutionProvider",))  # one name as a str
    assert session_kwargs(["CUDAExecutionProvider", "CPUExecutionProvider"]) == {}  # the GPU kernel is the fast one


@pytest.mark.parametrize("threads", [None, 1, 2])
def test_the_image_graph_pool_does_not_spin_when_the_text_graph_follows(tiny_split_engine, threads):
    """With a thread pool (threads > 1 or onnxruntime's default), the image graph's session has
    spin-waiting off (its idle worker would take the core the text graph's pool needs next); the
    text graph's keeps it (titles alone run faster with it); one thread has no pool to configure."""
    from sdk import Embedder

    def spinning(session):  # "" where the session keeps onnxruntime's default (spin)
        try:
            return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # onnxruntime: "does not have configuration with key"
            return ""

    with Embedder(tiny_split_engine.path, threads=threads) as emb:
        runner = emb._runner
        assert spinning(runner.image_session) == ("0" if threads != 1 else "")
        assert spinning(runner.text_session) == ""  # onnxruntime's default: spin
        assert runner.image_session.get_session_options().intra_op_num_threads == (threads or 0)
        v = emb.embed(images=[np.zeros((32, 32, 3), np.uint8)], texts=["red shoe"])
        assert np.isfinite(v).all()


def test_add_layernorm_gives_what_the_fused_skip_layernorm_gives():
    """The graph rewrite turned off on the CPU changes the time, not the arithmetic."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx", reason="builds its graph with onnx (the [export] extra)")
    from onnx import TensorProto, helper, numpy_helper

    from sdk.sessions import session_kwargs

    rng = np.random.default_rng(0)
    g, b = rng.random(24).astype(np.float32), rng.random(24).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "s"], ["a"]),
         helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1, epsilon=1e-12)],
        "skip_ln", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5, 24]) for n in ("x", "s")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(g, "g"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    feed = {"x": rng.standard_normal((2, 5, 24)).astype(np.float32), "s": rng.standard_normal((2, 5, 24)).astype(np.float32)}
    cpu = ["CPUExecutionProvider"]
    fused = ort.InferenceSession(model, providers=cpu).run(None, feed)[0]
    plain = ort.InferenceSession(model, providers=cpu, **session_kwargs(cpu)).run(None, feed)[0]
    np.testing.assert_allclose(plain, fused, rtol=0, atol=1e-5)
