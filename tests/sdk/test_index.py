"""sdk.index: faiss and NumPy give the same exact top-k; saved indexes refuse damage and other engines."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from sdk.errors import BackendUnavailableError, IndexFileError, InvalidInputError
from sdk.index import IndexConfig, VectorIndex, available_backends

pytest.importorskip("onnxruntime")

HAVE_FAISS = "faiss" in available_backends()
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss is not installed (pip install 'moon3-sdk[search]')")


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def brute_force(v: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best inner products, best first (a plain reference)."""
    return np.argsort(-(q @ v.T), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data():
    v = unit(3000, 32)
    ids = [f"sku-{i}" if i % 3 else i for i in range(len(v))]  # ints and strs
    q = unit(20, 32, seed=1)
    return v, ids, q


def test_numpy_top_k_is_the_exact_top_k(data):
    v, ids, q = data
    index = VectorIndex.build(v, ids, backend="numpy")
    assert index.backend == "numpy" and len(index) == 3000
    scores, got = index.search(q, k=10)
    want = brute_force(v, q, 10)
    assert got.tolist() == [[ids[p] for p in row] for row in want]
    np.testing.assert_allclose(scores, np.take_along_axis(q @ v.T, want, 1), atol=1e-6)
    # chunked scan (several chunks) and a 1-d query give the same
    from sdk.index import _numpy_topk

    s2, p2 = _numpy_topk(v, q, 10, chunk=7)
    assert p2.tolist() == want.tolist()
    assert index.search(q[0], k=10)[1].tolist() == got[:1].tolist()
    # k larger than the index: every vector, best first
    s_all, all_ids = index.search(q[:1], k=10_000)
    assert all_ids.shape == (1, 3000) and np.all(np.diff(s_all[0]) <= 0)


@needs_faiss
def test_faiss_and_numpy_give_the_same_top_k(data):
    v, ids, q = data
    f = VectorIndex.build(v, ids)
    n = VectorIndex.build(v, ids, backend="numpy")
    assert f.backend == "faiss"
    fs, fi = f.search(q, k=10)
    ns, ni = n.search(q, k=10)
    assert fi.tolist() == ni.tolist()
    np.testing.assert_allclose(fs, ns, atol=1e-5)


@needs_faiss
@pytest.mark.parametrize("config, min_recall", [(IndexConfig.hnsw(m=16, ef_search=64), 0.9),
                                                (IndexConfig.ivf(nlist=32, nprobe=8), 0.6)])
def test_approximate_indexes_find_most_of_the_exact_top_k(data, tmp_path, config, min_recall):
    v, ids, q = data
    exact = VectorIndex.build(v, ids, backend="numpy").search(q, k=10)[1]
    index = VectorIndex.build(v, ids, config)
    got = index.search(q, k=10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), exact.tolist())])
    assert recall >= min_recall, recall
    loaded = VectorIndex.load(index.save(tmp_path / "ix"))
    assert loaded.kind == config.kind and loaded.search(q, k=10)[1].tolist() == got.tolist()
    with pytest.warns(RuntimeWarning, match=rf"a '{config.kind}' index is searched exactly with NumPy"):
        as_numpy = VectorIndex.load(tmp_path / "ix", backend="numpy")
    assert as_numpy.search(q, k=10)[1].tolist() == exact.tolist()


@pytest.mark.parametrize("backend", ["numpy", pytest.param("faiss", marks=needs_faiss)])
def test_save_and_load_round_trip(data, tmp_path, backend):
    v, ids, q = data
    index = VectorIndex.build(v, ids, backend=backend)
    folder = index.save(tmp_path / "ix")
    assert sorted(p.name for p in folder.iterdir()) == ["ids.json", "index.json", "vectors.npy"]
    back = VectorIndex.load(folder, backend=backend)
    assert back.ids == ids and back.dim == 32 and back.backend == backend
    assert back.search(q, 5)[1].tolist() == index.search(q, 5)[1].tolist()


def test_faiss_missing_is_a_clear_error_and_numpy_is_the_default(data, monkeypatch):
    import sdk.index as mod

    v, ids, q = data
    monkeypatch.setattr(mod, "_faiss", lambda: None)
    assert available_backends() == ["numpy"]
    assert VectorIndex.build(v[:50], ids[:50]).backend == "numpy"
    with pytest.raises(BackendUnavailableError, match=r"pip install 'moon3-sdk\[search\]'"):
        VectorIndex.build(v[:50], ids[:50], backend="faiss")
    with pytest.warns(RuntimeWarning, match=r"'hnsw' index is searched exactly with NumPy: faiss is not installed"):
        VectorIndex.build(v[:50], ids[:50], IndexConfig.hnsw())
    with pytest.raises(ValueError, match=r"unknown search backend 'annoy'; available: \['numpy'\]"):
        VectorIndex.build(v[:50], ids[:50], backend="annoy")


def test_bad_vectors_ids_queries_and_configs(data):
    v, ids, q = data
    with pytest.raises(InvalidInputError, match="got 2 ids for 3 vectors"):
        VectorIndex.build(v[:3], ids[:2])
    with pytest.raises(InvalidInputError, match="id 'a' is given more than once"):
        VectorIndex.build(v[:3], ["a", "b", "a"])
    with pytest.raises(InvalidInputError, match="id 1 is a float; ids must be ints or strs"):
        VectorIndex.build(v[:3], [1, 1.5, 2])
    bad = v[:3].copy()
    bad[1, 4] = np.nan
    with pytest.raises(InvalidInputError, match=r"vectors row 1 is not finite"):
        VectorIndex.build(bad, [1, 2, 3])
    with pytest.raises(InvalidInputError, match="nothing to index"):
        VectorIndex.build(np.zeros((0, 32), np.float32), [])
    index = VectorIndex.build(v[:10], ids[:10], backend="numpy")
    with pytest.raises(InvalidInputError, match=r"queries must be \(n, 32\), got shape \(1, 16\)"):
        index.search(q[:, :16][:1])
    with pytest.raises(InvalidInputError, match="k must be an int >= 1"):
        index.search(q, k=0)
    with pytest.raises(ValueError, match="index kind must be one of"):
        IndexConfig("lsh")
    with pytest.raises(ValueError, match="ef_search must be an int >= 1, got 0"):
        IndexConfig.hnsw(ef_search=0)


# ------------------------------------------------------------------ engines and damaged folders


@pytest.fixture(scope="module")
def built(tiny_engine, tmp_path_factory):
    """An index of the tiny engine's text vectors: (embedder, folder, titles)."""
    from sdk import Embedder

    emb = Embedder(tiny_engine.path, threads=1)
    w = tiny_engine.words
    titles = [f"{a} {b}" for a in w[:8] for b in w[8:16] if a != b]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # token budget truncation of the tiny engine
        v = emb.embed(texts=titles)
    folder = VectorIndex.build(v, list(range(100, 100 + len(titles))), embedder=emb).save(
        tmp_path_factory.mktemp("ix") / "tiny.index")
    return emb, folder, titles


def test_an_index_finds_the_product_its_query_embeds_to(built):
    emb, folder, titles = built
    index = VectorIndex.load(folder, embedder=emb)
    assert index.engine["fingerprint"] == emb.fingerprint and index.engine["dim"] == 32
    scores, ids = index.search(emb.embed(texts=titles[:5]), k=3)
    assert ids[:, 0].tolist() == [100, 101, 102, 103, 104]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_an_index_of_another_engine_is_refused(built, tiny_split_engine, tmp_path):
    """The split engine has the same weights but other graphs (another fingerprint)."""
    from sdk import Embedder

    emb, folder, _ = built
    other = Embedder(tiny_split_engine.path, threads=1)
    assert other.fingerprint != emb.fingerprint and other.dim == emb.dim
    with pytest.raises(IndexFileError, match=r"the index was built with another engine \(tiny\.engine, .*rebuild the "
                                             r"index with this engine"):
        VectorIndex.load(folder, embedder=other)
    unknown = VectorIndex.build(unit(5, 32), list(range(5))).save(tmp_path / "anon")
    with pytest.raises(IndexFileError, match="the index records no engine"):
        VectorIndex.load(unknown, embedder=emb)
    with pytest.raises(InvalidInputError, match="the vectors are 64 wide; this engine gives at most 32"):
        VectorIndex.build(unit(5, 64), list(range(5)), embedder=emb)


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


@pytest.mark.parametrize("damage, match", [
    ("flip vectors", r"vectors\.npy: checksum mismatch; the index file was modified or corrupted"),
    ("truncate ids", r"ids\.json: checksum mismatch"),
    ("delete ids", r"ids\.json is missing; the index is incomplete"),
    ("delete manifest", r"no vector index here \(no index\.json\)"),
    ("garbage manifest", r"index\.json: not a readable index manifest"),
    ("manifest array", r"not a readable index manifest \(TypeError"),
    ("other format", r"not a moon3 vector index"),
    ("newer version", r"index format version 2 is not supported by this sdk \(reads version 1\)"),
    ("forged count", r"vectors\.npy is float32 \(\d+, 32\), the manifest says float32 \(7, 32\)"),
    ("forged ids", r"bad ids\.json \(id 100 is given more than once"),
    ("pickled vectors", r"unreadable index data \(ValueError"),
])
def test_a_damaged_index_is_refused(built, tmp_path, damage, match):
    import hashlib

    emb, folder, _ = built
    d = _copy(folder, tmp_path)
    man = json.loads((d / "index.json").read_text())

    def forge(name: str, data: bytes) -> None:  # new bytes with a matching checksum
        (d / name).write_bytes(data)
        man["files"][name] = hashlib.sha256(data).hexdigest()
        (d / "index.json").write_text(json.dumps(man))

    if damage == "flip vectors":
        raw = bytearray((d / "vectors.npy").read_bytes())
        raw[-7] ^= 0x10
        (d / "vectors.npy").write_bytes(bytes(raw))
    elif damage == "truncate ids":
        (d / "ids.json").write_bytes((d / "ids.json").read_bytes()[:-3])
    elif damage == "delete ids":
        (d / "ids.json").unlink()
    elif damage == "delete manifest":
        (d / "index.json").unlink()
    elif damage == "garbage manifest":
        (d / "index.json").write_bytes(b"\x00\xff not json")
    elif damage == "manifest array":
        (d / "index.json").write_text("[1, 2]")
    elif damage == "other format":
        (d / "index.json").write_text(json.dumps({**man, "format": "annoy"}))
    elif damage == "newer version":
        (d / "index.json").write_text(json.dumps({**man, "format_version": 2}))
    elif damage == "forged count":
        man["count"] = 7
        (d / "index.json").write_text(json.dumps(man))
    elif damage == "forged ids":
        ids = json.loads((d / "ids.json").read_text())
        forge("ids.json", json.dumps([ids[0]] * len(ids)).encode())
    elif damage == "pickled vectors":
        import io

        buf = io.BytesIO()
        np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        forge("vectors.npy", buf.getvalue())
    with pytest.raises(IndexFileError, match=match):
        VectorIndex.load(d, embedder=emb)


@needs_faiss
def test_a_damaged_faiss_file_is_refused(tmp_path):
    import hashlib

    v = unit(300, 16)
    folder = VectorIndex.build(v, list(range(300)), IndexConfig.hnsw(m=8)).save(tmp_path / "h")
    raw = (folder / "faiss.index").read_bytes()
    (folder / "faiss.index").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IndexFileError, match=r"faiss\.index: checksum mismatch"):
        VectorIndex.load(folder)
    man = json.loads((folder / "index.json").read_text())  # a forged checksum: faiss's own refusal
    man["files"]["faiss.index"] = hashlib.sha256(raw[: len(raw) // 2]).hexdigest()
    (folder / "index.json").write_text(json.dumps(man))
    with pytest.raises(IndexFileError, match=r"faiss cannot read faiss\.index"):
        VectorIndex.load(folder)


# ------------------------------------------------------------------ command line


def test_cli_index_build_and_search_round_trip(tiny_engine, tmp_path, capsys):
    from sdk.cli import main

    w = tiny_engine.words
    cat = tmp_path / "cat"
    cat.mkdir()
    (cat / "p.png").write_bytes(b"not a png")
    rows = [{"id": 10 + i, "title": f"{w[i]} {w[i + 1]}", "image": None} for i in range(6)]
    rows += [{"id": 99, "title": "bad photo", "image": "p.png"}, {"id": 10, "title": "repeated id"}]
    (cat / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ix"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny engine truncates long titles
        assert main(["index", "build", str(tiny_engine.path), "--catalog", str(cat), "--out", str(out),
                     "--threads", "1"]) == 1  # bad items: reported, left out
    cap = capsys.readouterr()
    assert "wrote" in cap.out and "6 of 8 products" in cap.out and "2 bad item(s)" in cap.out
    assert "record 6 image: not a recognised image format" in cap.err
    assert "record 7: id 10 repeats an earlier record's" in cap.err
    assert "8/8 products" in cap.err  # the progress bar
    assert main(["search", str(tiny_engine.path), "--index", str(out), "--catalog", str(cat),
                 "--query", f"{w[2]} {w[3]}", "-k", "3", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ix: 6 products, 32-d flat index on ")
    assert lines[1].startswith(f'text query "{w[2]} {w[3]}"')
    assert lines[2].split()[:3] == ["1.", "1.000", "12"] and f"{w[2]} {w[3]}" in lines[2]
    assert len(lines) == 5
    # a Matryoshka-prefix index: queries are embedded at its width
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["index", "build", str(tiny_engine.path), "--catalog", str(cat), "--out", str(tmp_path / "ix16"),
                     "--dim", "16", "--limit", "6", "--threads", "1"]) == 0
    assert "6 of 6 products, 16-d" in capsys.readouterr().out
    assert main(["search", str(tiny_engine.path), "--index", str(tmp_path / "ix16"), "--query", f"{w[2]} {w[3]}",
                 "-k", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "16-d flat index" in lines[0] and lines[2].split()[:3] == ["1.", "1.000", "12"]
    # the no-index mode still works, and an index is not optional without a catalog
    assert main(["search", str(tiny_engine.path), "--catalog", str(cat), "--query", w[0], "--k", "2",
                 "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["search", str(tiny_engine.path), "--query", w[0]]) == 2
    assert "search needs --index INDEX" in capsys.readouterr().err
    (out / "vectors.npy").write_bytes(b"\x93NUMPY garbage")
    assert main(["search", str(tiny_engine.path), "--index", str(out), "--query", w[0]]) == 2
    assert "vectors.npy: checksum mismatch" in capsys.readouterr().err


def test_the_index_module_stays_light():
    """`import sdk.index` imports neither faiss (lazy, optional) nor torch; searching with faiss
    imports faiss, still not torch."""
    import subprocess
    import sys

    from sdk.errors import SdkError

    assert issubclass(IndexFileError, SdkError)
    code = ("import sys, numpy as np; from sdk.index import VectorIndex; "
            "print('faiss' in sys.modules, 'torch' in sys.modules); "
            "v = np.eye(4, dtype=np.float32); VectorIndex.build(v, [1, 2, 3, 4]).search(v[:1], 2); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False"], out


@needs_faiss
def test_saving_over_an_index_of_another_kind_replaces_it(data, tmp_path):
    v, ids, q = data
    folder = VectorIndex.build(v[:500], ids[:500], IndexConfig.hnsw(m=8)).save(tmp_path / "ix")
    assert (folder / "faiss.index").is_file()
    VectorIndex.build(v[:300], ids[:300]).save(folder)
    assert not (folder / "faiss.index").exists()
    back = VectorIndex.load(folder)
    assert back.kind == "flat" and len(back) == 300
    with pytest.raises(ValueError, match="an IVF index with 64 lists needs at least 64 vectors, got 10"):
        VectorIndex.build(v[:10], ids[:10], IndexConfig.ivf(nlist=64))
