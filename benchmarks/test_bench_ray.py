"""Catalog throughput: one process vs the resumable job (sdk.batch) vs Ray Data with 1 and 2 actors.

The catalog is the sample products four times over (624 items with photos and titles); every
run embeds all of it and writes Parquet shards of 64 items. Ray is started once per module (on
loopback, num_cpus=2) and its start-up is not timed; each timed Ray run does include creating
its actor pool and loading the engine in every actor, as a real job does.

    MOON3_ENGINE=moon3.engine OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_bench_ray.py \
        --benchmark-columns=median,rounds --benchmark-group-by=group

items/s = 624 / median seconds, in each row's extra_info (`--benchmark-json`) and printed at the end.
Every run's vectors are checked against one untimed `Embedder.embed_products` pass (same ids in the
same order; cosine mean >= 0.9995, min >= 0.99: an INT8-dynamic engine scales activations per batch,
so an item's vector moves slightly with the items it is batched with, and the runs batch differently).
"""

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from catalogs import write_catalog

pytest.importorskip("pyarrow")

ENGINE = Path(os.environ.get("MOON3_ENGINE", "moon3.engine"))
COPIES = 4
SHARD = 64
RESULTS: dict[str, float] = {}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    if not ENGINE.is_file():
        pytest.skip(f"no engine at {ENGINE}: build one with `moon3 build` or set MOON3_ENGINE")
    cat = write_catalog(tmp_path_factory.mktemp("catalog"), copies=COPIES, bad=False)
    return cat


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="m3ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=tmp)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(catalog):
    """(ids, vectors) of the catalog from one untimed single-thread pass: what every timed run must give."""
    from sdk import Embedder
    from sdk.errors import TruncationWarning

    with Embedder(ENGINE, threads=1) as emb, warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        vectors = emb.embed_products(catalog.records, root=catalog.root)
    return [r["id"] for r in catalog.records], vectors


def _check(reference, ids, vectors) -> None:
    want_ids, want = reference
    assert list(ids) == want_ids
    assert vectors.shape == want.shape and np.isfinite(vectors).all()
    cos = (vectors.astype(np.float64) * want).sum(1)  # both L2-normalised
    assert cos.mean() >= 0.9995 and cos.min() >= 0.99, (
        f"cosine to the reference pass: mean {cos.mean():.6f}, min {cos.min():.6f} (item {int(cos.argmin())})")


def _record(benchmark, name: str, items: int) -> None:
    ips = items / benchmark.stats["median"]
    benchmark.extra_info["items_per_s"] = round(ips, 1)
    RESULTS[name] = ips


def _fresh(out: Path):
    def setup():
        shutil.rmtree(out, ignore_errors=True)

    return setup


@pytest.mark.parametrize("threads", [1, 2])
def test_single_process(benchmark, catalog, reference, threads):
    from sdk import Embedder
    from sdk.errors import TruncationWarning

    emb = Embedder(ENGINE, threads=threads)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            return emb.embed_products(catalog.records, root=catalog.root)

    benchmark.group = "catalog"
    v = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    _check(reference, reference[0], v)
    _record(benchmark, f"single process, Embedder({threads} thread{'s' * (threads > 1)})", len(catalog.records))


def test_batch_job_local(benchmark, catalog, reference, tmp_path):
    from sdk.batch import CatalogJob, read_vectors, run_local

    out = tmp_path / "out"
    job = CatalogJob(input=catalog.path, out=out, engine=ENGINE, root=catalog.root, shard_size=SHARD)
    benchmark.group = "catalog"
    s = benchmark.pedantic(lambda: run_local(job, threads=1), setup=_fresh(out), rounds=3, iterations=1)
    assert s.embedded == len(catalog.records)
    _check(reference, *read_vectors(out))
    _record(benchmark, "sdk.batch.run_local (1 thread, + Parquet shards)", len(catalog.records))


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_job(benchmark, catalog, reference, ray_cluster, tmp_path, workers):
    from sdk.batch import CatalogJob, read_vectors
    from sdk.ray import run_ray

    out = tmp_path / "out"
    job = CatalogJob(input=catalog.path, out=out, engine=ENGINE, root=catalog.root, shard_size=SHARD)
    benchmark.group = "catalog"
    s = benchmark.pedantic(lambda: run_ray(job, workers=workers, num_cpus=1, threads=1), setup=_fresh(out),
                           rounds=3, iterations=1)
    assert s.embedded == len(catalog.records)
    _check(reference, *read_vectors(out))
    _record(benchmark, f"sdk.ray.run_ray ({workers} actor{'s' * (workers > 1)} x 1 thread)", len(catalog.records))


def test_zz_print_summary(catalog):
    if not RESULTS:
        pytest.skip("nothing measured")
    width = max(map(len, RESULTS))
    print(f"\n{len(catalog.records)} items, {os.cpu_count()} CPUs")
    for name, ips in RESULTS.items():
        print(f"  {name:<{width}}  {ips:7.1f} items/s")
