"""Batch embedding on a local Ray cluster (sdk.ray): same output as one process; a killed driver resumes exactly.

The clusters are started by the tests on loopback, with their own temporary folder, no dashboard.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import pytest
from catalogs import reference, write_catalog

pytest.importorskip("pyarrow", reason="batch embedding needs pyarrow (pip install 'moon3-sdk[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is optional: pip install 'moon3-sdk[ray]'")

from sdk.batch import CatalogJob, read_vectors, run_local  # noqa: E402

# Ray Data 2.60 warns about its own deprecated settings when it creates its DataContext.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

ATOL = 1e-5  # the same fp32 graph on differently composed batches


def assert_exact(out, cat, ref) -> None:
    ids, vecs = read_vectors(out)
    errs = [json.loads(line)["id"] for line in (out / "errors.jsonl").read_text().splitlines()]
    counts = Counter(ids) + Counter(errs)
    assert sorted(counts) == sorted(r["id"] for r in cat.records), "lost or extra ids"
    assert max(counts.values()) == 1, f"duplicated ids: {[i for i, n in counts.items() if n > 1][:5]}"
    assert sorted(errs) == sorted(cat.bad_ids)
    np.testing.assert_allclose(vecs, np.stack([ref[i] for i in ids]), rtol=0, atol=ATOL)


def session_processes(sid: int, wait: float) -> list[int]:
    """Pids still alive in session `sid` after up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
                if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
                    pids.append(int(d))
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


@pytest.fixture
def ray_tmp():
    # A short path: Ray's socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="m3ray-", dir="/tmp") as d:
        yield d


def test_ray_job_equals_local_run(tiny_engine, tmp_path, ray_tmp):
    from sdk.ray import run_ray

    cat = write_catalog(tmp_path)
    seen = []
    job = CatalogJob(input=cat.path, out=tmp_path / "ray", engine=tiny_engine.path, root=cat.root, shard_size=16)
    s = run_ray(job, workers=2, threads=1, on_shard=seen.append,
                init_kwargs={"num_cpus": 2, "_temp_dir": ray_tmp})
    assert (s.items, s.bad, s.shards, s.shards_run) == (159, 3, 10, 10)
    assert sorted(c["index"] for c in seen) == list(range(10))
    assert_exact(tmp_path / "ray", cat, reference(tiny_engine.path, cat))
    local = run_local(CatalogJob(input=cat.path, out=tmp_path / "local", engine=tiny_engine.path, root=cat.root,
                                 shard_size=16), threads=1)
    assert local.shards == s.shards
    ir, vr = read_vectors(tmp_path / "ray")
    il, vl = read_vectors(tmp_path / "local")
    assert ir == il
    np.testing.assert_array_equal(vr, vl)  # same shards, same batches: bit-identical


def test_ray_runner_validates_arguments(tiny_engine, tmp_path):
    from sdk.ray import run_ray

    job = CatalogJob(input=tmp_path / "items.jsonl", out=tmp_path / "o", engine=tiny_engine.path)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        run_ray(job, workers=0)
    with pytest.raises(ValueError, match="num_cpus and num_gpus"):
        run_ray(job, num_gpus=-1)


@pytest.mark.slow
def test_killed_ray_worker_is_replaced_and_the_job_stays_exact(tiny_engine, tmp_path, ray_tmp):
    """SIGKILL an actor process after its first shard: Ray restarts it and retries its work; the
    job finishes in the same run with every id exactly once."""
    from sdk.ray import run_ray

    cat = write_catalog(tmp_path, copies=2)  # 315 items, 20 shards
    killed = []

    def kill_first_worker(counts):
        if not killed:
            os.kill(counts["pid"], signal.SIGKILL)
            killed.append(counts["pid"])

    job = CatalogJob(input=cat.path, out=tmp_path / "out", engine=tiny_engine.path, root=cat.root, shard_size=16)
    s = run_ray(job, workers=2, threads=1, on_shard=kill_first_worker,
                init_kwargs={"num_cpus": 2, "_temp_dir": ray_tmp})
    assert killed and (s.items, s.shards, s.shards_run) == (315, 20, 20)
    assert_exact(tmp_path / "out", cat, reference(tiny_engine.path, cat))


@pytest.mark.slow
def test_killed_ray_driver_restarts_exactly(tiny_engine, tmp_path, ray_tmp):
    """SIGKILL a `moon3 embed-catalog --runner ray` driver (and its local cluster) mid-run; run it again."""
    cat = write_catalog(tmp_path, copies=6)  # 939 items, 59 shards of 16
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sdk", "embed-catalog", str(tiny_engine.path), "--input", str(cat.path),
            "--out", str(out), "--root", str(cat.root), "--shard-size", "16", "--threads", "1",
            "--runner", "ray", "--workers", "2", "--ray-cpus", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    # Its own process group, so the kill reaches the driver and the Ray processes it started.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("vectors/part-*.parquet"))) < 3:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "fewer than 3 shards written in 120 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        committed = len(list(out.glob("vectors/part-*.parquet")))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    left = session_processes(proc.pid, wait=10)
    for pid in left:  # none should be left: Ray's processes share the driver's fate
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed job still running: {left}"
    committed = len(list(out.glob("vectors/part-*.parquet")))
    assert 0 < committed < 59, f"killed after {committed} of 59 shards: not mid-run"
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]  # 1: bad items were reported
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["items"] == 939 and summary["shards_run"] == 59 - committed
    assert_exact(out, cat, reference(tiny_engine.path, cat))
