"""sdk.Pipeline: reasoner completions and traces feeding the embedder, with the SQLite cache."""

import json
import time

import numpy as np
import pytest

from sdk.errors import BatchError, EngineError, InvalidInputError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def engines(tiny_split_engine, tmp_path_factory):
    """The tiny split embedder plus a tiny reasoner in one engine; and a copy marked trace-trained."""
    from tiny_models import tiny_reasoner_export, tiny_reasoner_tokenizer

    from sdk.engine import EngineFile, write_engine
    from sdk.export.bundle import reasoner_parts
    from sdk.train.reasoner_model import TASKS

    folder = tmp_path_factory.mktemp("pipe")
    model, tower, paths, parity = tiny_reasoner_export(folder / "r")
    section, rparts = reasoner_parts(folder / "r", tiny_reasoner_tokenizer().to_str().encode(), tasks=TASKS,
                                     max_len=64, parity=parity)
    src = EngineFile.read(tiny_split_engine.path)
    manifest = json.loads(json.dumps(src.manifest))
    manifest["reasoner"] = section
    parts = {n: src.part(n) for n in src.part_names} | rparts
    write_engine(folder / "both.engine", manifest, parts)
    manifest["embedder"]["trace_trained"] = True
    write_engine(folder / "traced.engine", manifest, parts)
    return folder / "both.engine", folder / "traced.engine"


def photo(seed):
    return np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8)


def test_completes_missing_titles_from_the_photo(engines, tmp_path):
    from sdk import Embedder
    from sdk.pipeline import Pipeline
    from sdk.reasoner import Reasoner

    both, _ = engines
    p = Pipeline(both, complete_title=True, trace_cache=tmp_path / "c.sqlite", threads=1, written_title_weight="joint")
    imgs, texts = [photo(0), photo(1), None], [None, "red shoe", "blue shirt"]
    v = p.embed(imgs, texts)
    caption = Reasoner(both, threads=1).generate(image=imgs[0], task="caption")
    assert p.last_generated == {0: {"caption": caption}}  # only the photo without a title
    want = Embedder(both, threads=1).embed(imgs, [caption or None, "red shoe", "blue shirt"])
    np.testing.assert_allclose(v, want, atol=1e-6)
    # cached: the same photo again is not generated again (by content hash), vectors unchanged
    hits = p.cache_hits
    np.testing.assert_allclose(p.embed([photo(0)], [None]), v[:1], atol=1e-6)
    assert p.cache_hits == hits + 1


@pytest.mark.parametrize("weight", [0.0, 0.35])
def test_a_written_title_enters_the_vector_only_as_far_as_its_weight(engines, weight):
    from sdk import Embedder
    from sdk.pipeline import Pipeline
    from sdk.reasoner import Reasoner

    both, _ = engines
    caption = Reasoner(both, threads=1).generate(image=photo(0), task="caption", max_new_tokens=96)
    assert caption  # the tiny reasoner writes something for this photo
    emb = Embedder(both, threads=1)
    imgs, texts = [photo(0), photo(1)], [None, "red shoe"]
    for dim in (None, 16):
        p = Pipeline(both, complete_title=True, threads=1, written_title_weight=weight)
        v = p.embed(imgs, texts, dim=dim)
        assert p.last_generated == {0: {"caption": caption}}
        plain = emb.embed(imgs, texts, dim=dim)  # the photo alone for item 0
        want = plain[0] + weight * emb.embed(texts=[caption], dim=dim)[0]
        np.testing.assert_allclose(v[0], want / np.linalg.norm(want), atol=1e-6)
        np.testing.assert_allclose(v[1], plain[1], atol=1e-6)  # a real title is untouched
    with pytest.raises(BatchError) as exc:  # a bad item beside it: the good row is still blended
        p.embed([photo(0), b"not an image"], [None, None], dim=dim)
    np.testing.assert_allclose(exc.value.vectors[0], v[0], atol=1e-6)
    assert list(exc.value.errors) == [1]
    assert Pipeline(both).written_title_weight == 0.0  # the default trusts no written title
    for bad in (-0.1, float("nan"), "fused", True):
        with pytest.raises(ValueError, match="written_title_weight"):
            Pipeline(both, complete_title=True, written_title_weight=bad)


def test_reasoning_needs_a_trace_trained_embedder(engines, tmp_path):
    from sdk.pipeline import Pipeline

    both, traced = engines
    with pytest.raises(EngineError, match="not trained with reasoning traces"):
        Pipeline(both, reason="on")
    with pytest.raises(ValueError, match=r'needs a cache file \(trace_cache="traces\.sqlite"\)'):
        Pipeline(traced, reason="cached")
    with pytest.raises(ValueError, match="reason must be one of"):
        Pipeline(traced, reason="always")


def test_traces_are_generated_cached_and_embedded(engines, tmp_path):
    from sdk import Embedder
    from sdk.pipeline import Pipeline
    from sdk.reasoner import Reasoner

    _, traced = engines
    cache = tmp_path / "t.sqlite"
    p = Pipeline(traced, reason="cached", trace_cache=cache, max_trace_tokens=8, threads=1)
    imgs, texts, ids = [photo(2), None], ["red shoe", "black watch"], [7, 8]
    v = p.embed(imgs, texts, ids=ids)
    r = Reasoner(traced, threads=1)
    traces = [r.generate(image=imgs[0], text="red shoe", task="trace", max_new_tokens=8),
              r.generate(text="black watch", task="trace", max_new_tokens=8)]
    assert [p.last_generated[i]["trace"] for i in (0, 1)] == traces
    want = Embedder(traced, threads=1).embed(imgs, texts, [t or None for t in traces])
    np.testing.assert_allclose(v, want, atol=1e-6)
    p.close()
    p2 = Pipeline(traced, reason="cached", trace_cache=cache, max_trace_tokens=8, threads=1)
    np.testing.assert_allclose(p2.embed(imgs, texts, ids=ids), v, atol=1e-6)
    assert p2.cache_hits == 2  # the catalog side is generated once


def test_bad_items_are_reported_not_lost(engines, tmp_path):
    from sdk.pipeline import Pipeline

    both, _ = engines
    p = Pipeline(both, complete_title=True, threads=1)
    with pytest.raises(BatchError) as exc:
        p.embed([photo(0), b"not an image", None], [None, None, "red"])
    assert list(exc.value.errors) == [1] and np.isfinite(exc.value.vectors[[0, 2]]).all()
    with pytest.raises(InvalidInputError, match="one entry per item"):
        p.embed([photo(0)], ["a", "b"])
    (tmp_path / "bad.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InvalidInputError, match="not a usable trace cache"):
        Pipeline(both, complete_title=True, trace_cache=tmp_path / "bad.sqlite")


def test_reason_on_writes_traces_within_the_budget_and_embeds_them(engines):
    from sdk import Embedder
    from sdk.pipeline import Pipeline
    from sdk.reasoner import Reasoner

    _, traced = engines
    imgs, texts = [photo(2), None], ["red shoe", "black watch"]
    p = Pipeline(traced, reason="on", max_trace_tokens=4, threads=1)
    assert p.trace_cache is None
    v = p.embed(imgs, texts)
    r = Reasoner(traced, threads=1)
    for i in (0, 1):
        ids = r.generate_ids(image=imgs[i], text=texts[i], task="trace", max_new_tokens=4)
        longer = r.generate_ids(image=imgs[i], text=texts[i], task="trace", max_new_tokens=12)
        assert len(ids) <= 4 and ids == longer[: len(ids)]
        assert p.last_generated[i]["trace"] == r.decode(ids)
    assert p.reasoner.last_stats["new_tokens"] <= 4
    traces = [p.last_generated[i]["trace"] for i in (0, 1)]
    assert all(traces)
    e = Embedder(traced, threads=1)
    np.testing.assert_allclose(v, e.embed(imgs, texts, traces), atol=1e-6)
    assert not np.allclose(v, e.embed(imgs, texts), atol=1e-4)  # the traces changed the vectors


def test_the_trace_cache_is_keyed_by_the_budget(engines, tmp_path):
    from sdk.pipeline import Pipeline
    from sdk.reasoner import Reasoner

    _, traced = engines
    cache = tmp_path / "t.sqlite"
    imgs, texts, ids = [photo(2), None], ["red shoe", "black watch"], [7, 8]
    r = Reasoner(traced, threads=1)

    def run(budget):
        p = Pipeline(traced, reason="cached", trace_cache=cache, max_trace_tokens=budget, threads=1)
        p.embed(imgs, texts, ids=ids)
        p.close()
        return p, [p.last_generated[i]["trace"] for i in (0, 1)]

    short, short_traces = run(2)
    assert short.cache_hits == 0
    longer, longer_traces = run(10)
    assert longer.cache_hits == 0 and longer.reasoner_loaded  # another budget: generated anew
    assert longer_traces == [r.generate(image=i, text=t, task="trace", max_new_tokens=10) for i, t in zip(imgs, texts)]
    assert longer_traces != short_traces
    again, again_traces = run(2)
    assert again.cache_hits == 2 and not again.reasoner_loaded and again_traces == short_traces


def test_a_trace_cache_from_before_the_budget_key_is_discarded_once(engines, tmp_path):
    import sqlite3
    import warnings

    from sdk.pipeline import CACHE_SCHEMA, Pipeline

    _, traced = engines
    old = tmp_path / "old.sqlite"
    db = sqlite3.connect(old)  # the first schema: no budget in the key, no user_version
    db.execute("CREATE TABLE generated (reasoner TEXT, kind TEXT, key TEXT, text TEXT, "
               "PRIMARY KEY (reasoner, kind, key))")
    fingerprint = Pipeline(traced, reason="on", threads=1).fingerprint
    db.executemany("INSERT INTO generated VALUES (?, ?, ?, ?)",
                   [(fingerprint, "trace", "id:7", "stale trace"), ("0123", "caption", "id:8", "stale title")])
    db.commit()
    db.close()
    with pytest.warns(RuntimeWarning, match=r"old\.sqlite: this trace cache was written by an older sdk without the "
                                            r"token budget in its key; its 2 entries were discarded"):
        p = Pipeline(traced, reason="cached", trace_cache=old, max_trace_tokens=4, threads=1)
    p.embed([photo(2)], ["red shoe"], ids=[7])
    assert p.cache_hits == 0 and p.last_generated[0]["trace"] != "stale trace"
    p.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # upgraded: no second warning
        again = Pipeline(traced, reason="cached", trace_cache=old, max_trace_tokens=4, threads=1)
    again.embed([photo(2)], ["red shoe"], ids=[7])
    assert again.cache_hits == 1 and len(again.trace_cache) == 1
    again.close()
    # an up-to-date cache is not written to on open: it opens (and reads) while another process
    # holds the write lock, as a read-only one would
    writer = sqlite3.connect(old)
    writer.execute("BEGIN IMMEDIATE")
    t0 = time.perf_counter()
    from sdk.pipeline import TextCache

    ro = TextCache(old)
    assert time.perf_counter() - t0 < 2.0 and len(ro) == 1
    ro.close()
    writer.rollback()
    writer.close()
    db = sqlite3.connect(old)
    db.execute(f"PRAGMA user_version = {CACHE_SCHEMA + 1}")
    db.close()
    with pytest.raises(InvalidInputError, match=rf"old\.sqlite: trace cache schema {CACHE_SCHEMA + 1} was written by a "
                                                rf"newer sdk; this one reads schema {CACHE_SCHEMA}"):
        Pipeline(traced, reason="cached", trace_cache=old, threads=1)


def test_cache_is_the_deprecated_name_of_trace_cache(engines, tmp_path):
    from sdk.pipeline import Pipeline

    both, traced = engines
    with pytest.warns(DeprecationWarning, match=r"Pipeline\(cache=\.\.\.\) is deprecated; use trace_cache="):
        p = Pipeline(both, complete_title=True, cache=tmp_path / "c.sqlite", threads=1)
    assert p.trace_cache is not None and p.trace_cache.path == tmp_path / "c.sqlite"
    with pytest.warns(DeprecationWarning, match=r"Pipeline\.cache is deprecated; use Pipeline\.trace_cache"):
        assert p.cache is p.trace_cache
    p.close()
    with pytest.raises(ValueError, match=r"give trace_cache= only; cache= is its deprecated name"):
        Pipeline(both, trace_cache=tmp_path / "a.sqlite", cache=tmp_path / "b.sqlite")
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"max_trace_tokens must be an int >= 0, got {bad!r}"):
            Pipeline(traced, reason="on", max_trace_tokens=bad)


def test_providers_reach_the_embedder_and_the_reasoner(engines, inactive_cuda):
    """As `sdk.Embedder`: an inactive backend warns and `.backend` tells what runs, for both models."""
    from sdk.pipeline import Pipeline

    _, traced = engines
    asked = inactive_cuda
    inactive = r"requested backend\(s\) \['cuda'\] are not active.*"
    with pytest.warns(RuntimeWarning, match=inactive + "embedding runs on 'cpu'"):
        p = Pipeline(traced, reason="on", max_trace_tokens=2, providers=["cuda", "cpu"], threads=1)
    n = len(asked)
    with pytest.warns(RuntimeWarning, match=inactive + "reasoner runs on 'cpu'"):
        assert p.embed([None], ["red shoe"]).shape == (1, p.embedder.dim)
    assert p.embedder.backend == "cpu" and p.reasoner.backend == "cpu"
    assert n > 0 and len(asked) > n and all(a == ["CUDAExecutionProvider", "CPUExecutionProvider"] for a in asked)
    with pytest.raises(ValueError, match=r"unknown backend 'rocm'; available: \['cpu', 'cuda', 'tensorrt'\]"):
        Pipeline(traced, providers=["rocm"])


# ------------------------------------------------------------------ lazy reasoner, per-part verification


def _damaged(src, dst, part: str):
    """A copy of the engine `src` with one byte of `part` flipped (the manifest left intact)."""
    from sdk.engine import EngineFile

    with EngineFile.open(src) as e:
        off, size, _ = e._index[part]
    raw = bytearray(src.read_bytes())
    raw[off + size // 2] ^= 0x01
    dst.write_bytes(bytes(raw))
    return dst


def test_reasoner_is_loaded_only_when_text_must_be_generated(engines, tmp_path):
    from sdk.pipeline import Pipeline

    both, traced = engines
    off = Pipeline(both, threads=1)
    assert off.reasoner is None and not off.reasoner_loaded
    p = Pipeline(both, complete_title=True, threads=1)
    p.embed([photo(0), None], ["red shoe", "blue shirt"])  # every item has a title: nothing to write
    assert not p.reasoner_loaded and p.last_generated == {}
    p.embed([photo(0)], [None])
    assert p.reasoner_loaded and list(p.last_generated) == [0]
    # "cached": a second pipeline over a filled cache never loads the reasoner
    cache = tmp_path / "t.sqlite"
    imgs, texts, ids = [photo(2), None], ["red shoe", "black watch"], [7, 8]
    first = Pipeline(traced, reason="cached", trace_cache=cache, max_trace_tokens=8, threads=1)
    v = first.embed(imgs, texts, ids=ids)
    assert first.reasoner_loaded
    first.close()
    again = Pipeline(traced, reason="cached", trace_cache=cache, max_trace_tokens=8, threads=1)
    np.testing.assert_array_equal(again.embed(imgs, texts, ids=ids), v)
    assert again.cache_hits == 2 and not again.reasoner_loaded
    again.embed([photo(3)], ["new shoe"], ids=[9])  # a miss: now it is loaded
    assert again.reasoner_loaded and again.cache_hits == 2


@pytest.mark.parametrize("part", ["reasoner_visual.onnx", "reasoner_step.onnx", "reasoner_tokenizer.json"])
def test_a_damaged_reasoner_part_does_not_stop_embedding(engines, tmp_path, part):
    """The embedder never reads the reasoner's parts; the reasoner refuses the damaged one by its
    checksum, before ONNX Runtime or the tokenizer sees it, wherever it is opened."""
    from sdk import Embedder
    from sdk.pipeline import Pipeline
    from sdk.reasoner import Reasoner

    both, _ = engines
    bad = _damaged(both, tmp_path / "bad.engine", part)
    items = ([photo(0), None], ["red shoe", "blue shirt"])
    want = Embedder(both, threads=1).embed(*items)
    np.testing.assert_array_equal(Embedder(bad, threads=1).embed(*items), want)
    np.testing.assert_array_equal(Pipeline(bad, threads=1).embed(*items), want)
    p = Pipeline(bad, complete_title=True, threads=1)
    np.testing.assert_array_equal(p.embed(*items), want)  # nothing to generate: the reasoner is not opened
    msg = rf"bad\.engine: checksum mismatch in part '{part}'; the file was modified or corrupted"
    with pytest.raises(EngineError, match=msg):
        p.embed([photo(0)], [None])  # a title to write: the reasoner is opened and refuses the part
    with pytest.raises(EngineError, match=msg):
        Reasoner(bad, threads=1)


def test_a_damaged_embedder_part_is_refused_by_the_pipeline(engines, tmp_path):
    from sdk.pipeline import Pipeline

    both, _ = engines
    bad = _damaged(both, tmp_path / "bad.engine", "text.onnx")
    with pytest.raises(EngineError, match=r"checksum mismatch in part 'text\.onnx'"):
        Pipeline(bad, complete_title=True, threads=1)


def test_a_reasoner_graph_naming_external_files_is_refused(engines, tmp_path):
    """As for the embedder: ONNX Runtime would read external data relative to the working folder."""
    onnx = pytest.importorskip("onnx")
    from sdk.engine import EngineFile, write_engine
    from sdk.reasoner import Reasoner

    both, _ = engines
    src = EngineFile.read(both)
    part = src.manifest["reasoner"]["parts"]["visual"]
    model = onnx.load_model_from_string(src.part(part))
    onnx.external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=0)
    parts = {n: src.part(n) for n in src.part_names} | {part: model.SerializeToString()}
    bad = write_engine(tmp_path / "ext.engine", src.manifest, parts)
    with pytest.raises(EngineError, match=rf"part '{part}' keeps tensor data in external files"):
        Reasoner(bad, threads=1)


def test_the_reasoner_is_loaded_once_by_concurrent_callers(engines):
    from concurrent.futures import ThreadPoolExecutor

    from sdk.pipeline import Pipeline

    both, _ = engines
    p = Pipeline(both, complete_title=True, threads=1)
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda _: p.reasoner, range(8)))
    assert p.reasoner_loaded and all(r is got[0] for r in got)
    assert p._engine._finalizer.alive is False  # the file is closed once the reasoner is in memory


def test_bench_times_think_then_embed_per_budget(engines, tmp_path, capsys):
    """`moon3 bench` on an engine that may reason: one row per budget, tokens within the budget,
    budget 0 the embedder alone; an engine whose embedder was not trained with traces has none."""
    from sdk.bench import bench_think_then_embed, run_bench

    both, traced = engines
    imgs, titles = [photo(5), photo(6)], ["red shoe", "black leather watch"]
    rows = bench_think_then_embed(traced, imgs, titles, budgets=(2, 0, 6), rounds=2, warmup=0, threads=1)
    assert [r["budget"] for r in rows] == [2, 0, 6]
    rows = [rows[1], rows[0], rows[2]]  # the ratio to budget 0 holds whatever the order
    assert rows[0]["trace_tokens"] == 0.0 and "x_embedder_alone" not in rows[0]
    assert 0 < rows[1]["trace_tokens"] <= 2 and 0 < rows[2]["trace_tokens"] <= 6
    assert all(r["x_embedder_alone"] > 0 and r["rounds"] == 2 for r in rows[1:])
    with pytest.raises(ValueError, match="budgets >= 0"):
        bench_think_then_embed(traced, imgs, titles, budgets=(-1,))
    from PIL import Image

    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"id": i, "image": f"{i}.png", "title": t}) + "\n"
                                                  for i, t in enumerate(titles)))
    kw = dict(modalities=("text",), batches=(1,), rounds=2, warmup=0, threads=1, cold_start=False, budgets=(0, 2),
              samples=tmp_path, reasoner=False)  # the tiny reasoner reads short prompts only
    assert [r["budget"] for r in run_bench(traced, **kw)["think_then_embed"]] == [0, 2]
    assert "think_then_embed" not in run_bench(both, **kw)  # not trace-trained: nothing to time
    assert "think_then_embed" not in run_bench(traced, **kw, think_then_embed=False)
    from sdk.cli import main

    assert main(["bench", str(traced), "--modality", "text", "--batch", "1", "--rounds", "2", "--no-cold-start",
                 "--samples", str(tmp_path), "--budget", "0", "--budget", "3"]) == 0
    out = capsys.readouterr().out
    assert "think-then-embed, budget   0" in out and "think-then-embed, budget   3" in out
    with pytest.raises(SystemExit):
        main(["bench", str(traced), "--budget", "-2"])
    assert "expected a token budget >= 0, got '-2'" in capsys.readouterr().err
