"""Resumable batch embedding without Ray (sdk.batch): exact output, resume after a crash, refusals.

Every test checks the invariant the module promises: each catalog id is in exactly one of the
vectors and errors outputs, once, and the vectors equal a single-process `sdk.Embedder` run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from catalogs import reference, write_catalog

pa = pytest.importorskip("pyarrow", reason="batch embedding needs pyarrow (pip install 'moon3-sdk[ray]')")

from sdk.batch import CatalogJob, plan, read_vectors, run_local  # noqa: E402
from sdk.cli import main  # noqa: E402
from sdk.errors import InvalidInputError, SdkError  # noqa: E402

ATOL = 1e-5  # the same fp32 graph on differently composed batches


def errors_of(out) -> dict:
    lines = (out / "errors.jsonl").read_text().splitlines()
    return {e["id"]: e["error"] for e in map(json.loads, lines)}


def assert_exact(out, cat, ref) -> None:
    """Every id once, in vectors or errors; bad ids in errors; vectors equal the reference."""
    ids, vecs = read_vectors(out)
    errs = errors_of(out)
    counts = Counter(ids) + Counter(list(errs))
    assert sorted(counts) == sorted(r["id"] for r in cat.records), "lost or extra ids"
    assert max(counts.values()) == 1, f"duplicated ids: {[i for i, n in counts.items() if n > 1][:5]}"
    assert sorted(errs) == sorted(cat.bad_ids)
    expected = np.stack([ref[i] for i in ids])
    np.testing.assert_allclose(vecs, expected, rtol=0, atol=ATOL)


@pytest.fixture
def catalog(tmp_path):
    return write_catalog(tmp_path)


def job(cat, engine, out, **kw):
    return CatalogJob(input=cat.path, out=out, engine=engine, root=cat.root, **{"shard_size": 16, **kw})


def test_run_local_is_exact_and_reports_bad_items(tiny_engine, catalog, tmp_path):
    out = tmp_path / "out"
    s = run_local(job(catalog, tiny_engine.path, out), threads=1)
    assert (s.items, s.bad, s.shards, s.shards_run) == (159, 3, 10, 10)
    assert_exact(out, catalog, reference(tiny_engine.path, catalog))
    errs = errors_of(out)
    assert "nothing to embed" in errs[900_002]
    assert "does-not-exist.jpg" in errs[900_003]
    assert json.loads((out / "summary.json").read_text())["embedded"] == 156
    # Output schema: (id int64, vector float32[dim]).
    t = pa.parquet.read_table(out / "vectors" / "part-00000.parquet")
    assert t.schema.field("id").type == pa.int64()
    assert t.schema.field("vector").type == pa.list_(pa.float32(), 32)


def test_resume_after_a_crash_embeds_only_what_is_missing(tiny_engine, catalog, tmp_path):
    out = tmp_path / "out"
    j = job(catalog, tiny_engine.path, out)

    class Crash(Exception):
        pass

    done = []

    def crash_after_three(counts):
        done.append(counts["index"])
        if len(done) == 3:
            raise Crash

    with pytest.raises(Crash):
        run_local(j, threads=1, on_shard=crash_after_three)
    assert not (out / "summary.json").exists()
    committed = {p.name: p.stat().st_mtime_ns for p in (out / "vectors").glob("part-*.parquet")}
    assert len(committed) == 3
    # What a writer killed at other moments leaves behind: a partial temporary file, an errors
    # file whose vectors file never came, and a vectors file cut short.
    (out / "vectors" / "part-00005.parquet.tmp-123-abcd").write_bytes(b"PAR1 partial")
    (out / "errors" / "part-00006.jsonl").write_text('{"id": 1, "error": "stale"}\n')
    (out / "vectors" / "part-00007.parquet").write_bytes(b"PAR1 cut short")

    p = plan(j)
    assert sorted(p.done) == sorted(done) and len(p.pending) == 7
    assert not list((out / "vectors").glob("*.tmp-*")), "stale temporary files are removed"
    s = run_local(j, threads=1)
    assert s.shards_run == 7
    after = {p.name: p.stat().st_mtime_ns for p in (out / "vectors").glob("part-*.parquet")}
    assert all(after[n] == t for n, t in committed.items()), "a committed shard was embedded again"
    assert_exact(out, catalog, reference(tiny_engine.path, catalog))


def test_a_shard_that_fails_verification_is_redone(tiny_engine, catalog, tmp_path):
    out = tmp_path / "out"
    j = job(catalog, tiny_engine.path, out)
    run_local(j, threads=1)
    # Drop one row of shard 2 (as a writer of another version might have): ids no longer match.
    f = out / "vectors" / "part-00002.parquet"
    t = pa.parquet.read_table(f)
    pa.parquet.write_table(t.slice(1), f)
    p = plan(j)
    assert [s.index for s in p.pending] == [2]
    assert run_local(j, threads=1).shards_run == 1
    assert_exact(out, catalog, reference(tiny_engine.path, catalog))
    assert run_local(j, threads=1).shards_run == 0  # finished: nothing to do


def test_parquet_catalog_gives_the_same_output(tiny_engine, catalog, tmp_path):
    recs = [{k: r.get(k) for k in ("id", "title", "image")} for r in catalog.records]
    src = tmp_path / "items.parquet"
    # Small row groups, so shards cross row-group boundaries.
    pa.parquet.write_table(pa.Table.from_pylist(recs), src, row_group_size=10)
    run_local(job(catalog, tiny_engine.path, tmp_path / "a"), threads=1)
    run_local(CatalogJob(input=src, out=tmp_path / "b", engine=tiny_engine.path, root=catalog.root, shard_size=16),
              threads=1)
    ia, va = read_vectors(tmp_path / "a")
    ib, vb = read_vectors(tmp_path / "b")
    assert ia == ib
    np.testing.assert_array_equal(va, vb)
    assert errors_of(tmp_path / "a") == errors_of(tmp_path / "b")


def test_another_job_in_the_same_folder_is_refused(tiny_engine, catalog, tmp_path):
    out = tmp_path / "out"
    run_local(job(catalog, tiny_engine.path, out), threads=1)
    with pytest.raises(SdkError, match="holds another job .*shard_size"):
        plan(job(catalog, tiny_engine.path, out, shard_size=8))
    with open(catalog.path, "a") as f:
        f.write(json.dumps({"id": 42, "title": "Men Black Watch"}) + "\n")
    with pytest.raises(SdkError, match="input_sha256"):
        plan(job(catalog, tiny_engine.path, out))
    s = run_local(job(catalog, tiny_engine.path, out, shard_size=8), threads=1, overwrite=True)
    assert (s.items, s.shards) == (160, 20)
    assert len(list((out / "vectors").glob("part-*.parquet"))) == 20


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"id": 1, "title": "a"}', '{"id": 1, "title": "b"}'], "duplicate id 1"),
        (['{"id": 1, "title": "a"}', '{"title": "b"}'], r"items.jsonl:2: .*with an 'id'"),
        (['{"id": 1, "title": "a"}', "", "{broken"], r"items.jsonl:3: not valid JSON"),
        (['{"id": 1, "title": "a"}', '{"id": "x", "title": "b"}'], "mix ints and strings"),
        (['{"id": true, "title": "a"}'], "'id' must be a non-empty str or an int"),
    ],
)
def test_bad_catalogs_are_refused_before_any_work(tiny_engine, tmp_path, lines, match):
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInputError, match=match):
        plan(CatalogJob(input=src, out=tmp_path / "out", engine=tiny_engine.path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw, match", [({"shard_size": 0}, "shard_size"), ({"batch_size": True}, "batch_size"),
                                       ({"dim": -1}, "dim"), ({"input": "items.csv"}, ".jsonl or .parquet")])
def test_job_config_is_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        CatalogJob(**{"input": "items.jsonl", "out": "out", "engine": "e.engine", **kw})


def test_cli_embed_catalog(tiny_engine, catalog, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["embed-catalog", str(tiny_engine.path), "--input", str(catalog.path), "--out", str(out),
            "--root", str(catalog.root), "--shard-size", "40", "--threads", "1", "--dim", "16"]
    assert main(argv) == 1  # some items were bad
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["items"], summary["bad"], summary["shards"]) == (159, 3, 4)
    ids, v = read_vectors(out)
    assert v.shape == (156, 16)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_killed_process_restarts_exactly(tiny_engine, tmp_path):
    """SIGKILL a real `moon3 embed-catalog` process mid-run, run it again: every id exactly once."""
    cat = write_catalog(tmp_path, copies=4)  # 627 items, 40 shards of 16
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sdk", "embed-catalog", str(tiny_engine.path), "--input", str(cat.path),
            "--out", str(out), "--root", str(cat.root), "--shard-size", "16", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("vectors/part-*.parquet")):
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no shard was written in 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)  # freeze it, then count what it had committed
        committed = len(list((out / "vectors").glob("part-*.parquet")))
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert 0 < committed < 40, f"killed after {committed} of 40 shards: not mid-run"
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # 1: bad items were reported
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["shards_run"] == 40 - committed and summary["items"] == 627
    assert_exact(out, cat, reference(tiny_engine.path, cat))
