"""Catalog-scale batch embedding on Ray Data: the shards of `sdk.batch` spread over an actor pool.

    from sdk.batch import CatalogJob
    from sdk.ray import run_ray
    summary = run_ray(CatalogJob(input="items.jsonl", out="vectors/", engine="moon3.engine"), workers=4)

Each actor loads the engine once (`sdk.batch.ShardEmbedder`) and then embeds whole input shards,
one `map_batches` row per shard, and commits each shard's files itself (temporary name + rename),
so the output is the same as `sdk.batch.run_local`'s and a killed job restarts where it stopped
(see `sdk.batch` for why every item comes out exactly once). GPU actors: `num_gpus=1` (and
providers=["cuda"] or ["tensorrt"], the default when num_gpus > 0).

Ray is imported only inside this module: `pip install 'moon3-sdk[ray]'`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from sdk.batch import CatalogJob, JobSummary, Shard, ShardEmbedder, finalize, plan

__all__ = ["run_ray"]


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"Ray batch embedding needs Ray Data ({exc}): pip install 'moon3-sdk[ray]'") from exc
    return ray


class _ShardUDF:
    """Ray Data callable class: one per actor, so the engine is loaded once per actor."""

    def __init__(self, job: dict, dim: int, id_type: str, providers: Any, threads: int | None):
        self._worker = ShardEmbedder(CatalogJob.from_dict(job), dim, id_type, providers=providers, threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fields = ("index", "start", "stop", "offset", "length", "ids_digest")
        rows = [self._worker(Shard(*(_plain(batch[f][r]) for f in fields))) for r in range(len(batch["index"]))]
        return {k: np.array([c[k] for c in rows], dtype=np.int64) for k in ("index", "items", "embedded", "bad", "pid")}


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def run_ray(
    job: CatalogJob,
    *,
    workers: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
    providers: Any = None,
    threads: int | None = None,
    overwrite: bool = False,
    address: str | None = None,
    init_kwargs: dict[str, Any] | None = None,
    on_shard: Callable[[dict[str, int]], None] | None = None,
) -> JobSummary:
    """Run a job on Ray: plan here, embed the pending shards on `workers` actors, finalize here.

    Args:
        job: the job (`sdk.batch.CatalogJob`).
        workers: actors in the pool, each with its own engine session.
        num_cpus: CPUs reserved per actor; also its ONNX Runtime threads unless `threads` is set.
        num_gpus: GPUs per actor (0 = CPU actors).
        providers: `sdk.Embedder` backends; None = ["cpu"], or ["cuda", "cpu"] when num_gpus > 0.
        threads: ONNX Runtime intra-op threads per actor.
        overwrite: as in `sdk.batch.plan`.
        address: a Ray cluster to join ("auto", "ray://..."); None starts a local one (on
            loopback, no dashboard) unless Ray is already initialised in this process.
        init_kwargs: more `ray.init` arguments when this call starts Ray.
        on_shard: called on the driver with each finished shard's counts.

    Returns:
        The `sdk.batch.JobSummary`.

    Raises:
        ImportError: Ray Data is not installed.
        ValueError: workers < 1 or negative resources.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if num_cpus < 0 or num_gpus < 0:
        raise ValueError(f"num_cpus and num_gpus must be >= 0, got {num_cpus}, {num_gpus}")
    ray = _ray()
    t0 = time.perf_counter()
    p = plan(job, overwrite=overwrite)
    pending = p.pending
    if pending:
        started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False}
            if address is None:  # a local instance for this job: loopback only
                kw["_node_ip_address"] = "127.0.0.1"
            kw.update(init_kwargs or {})
            ray.init(address=address or "local", **kw)
            started = True
        try:
            if providers is None:
                providers = ["cuda", "cpu"] if num_gpus > 0 else ["cpu"]
            if threads is None and num_cpus >= 1:
                threads = int(num_cpus)
            rows = [{"index": s.index, "start": s.start, "stop": s.stop, "offset": s.offset, "length": s.length,
                     "ids_digest": s.ids_digest} for s in pending]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            done = ds.map_batches(
                _ShardUDF,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                fn_constructor_kwargs={"job": job.to_dict(), "dim": p.dim, "id_type": p.id_type,
                                       "providers": providers, "threads": threads},
            )
            for row in done.iter_rows():
                if on_shard is not None:
                    on_shard({k: int(v) for k, v in row.items()})
        finally:
            if started:
                ray.shutdown()
    return finalize(p, shards_run=len(pending), seconds=time.perf_counter() - t0)
