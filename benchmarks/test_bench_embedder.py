"""The embedder on real sample products: moon3 engines (each precision, each backend present)
against the FP32 PyTorch teacher in eager mode, same inputs, same run.

    MOON3_ENGINE=moon3.engine MOON3_ENGINE_FP32=moon3-fp32.engine [MOON3_ENGINE_FP16=moon3-fp16.engine] \
        [MOON3_ENGINE_SINGLE=one-graph.engine] \
        .venv/bin/python -m pytest benchmarks/test_bench_embedder.py --benchmark-json=embedder.json

(`benchmarks/run.sh` runs this with the peers and writes the report.) Per modality (photo +
title, title only, photo only) and batch size 1/8/32: latency (p50, p99), items/s; every timed
call's vectors are checked against the teacher's (cosine). In fresh processes: cold start
(`import sdk` -> engine loaded -> first vector) and peak RSS. Photo decode and preprocessing are
inside every timed call, for the engine and the teacher alike.
"""

from __future__ import annotations

import numpy as np
import pytest
from bench_common import BATCHES, MODALITIES, THREADS, check_fidelity, engine_from_env, modality_call, record

# precision label -> the variable naming its engine; "int8-single" is an optional one-graph INT8
# engine (`moon3 build --layout single`), to see what the split into image and text graphs buys.
ENGINE_VARS = {"int8": "MOON3_ENGINE", "fp16": "MOON3_ENGINE_FP16", "fp32": "MOON3_ENGINE_FP32",
               "int8-single": "MOON3_ENGINE_SINGLE"}
BACKENDS = ("cpu", "cuda", "tensorrt")

_embedders: dict = {}


def _embedder(precision: str, backend: str):
    path = engine_from_env(ENGINE_VARS[precision])
    from sdk.sessions import available_backends

    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} is not in this onnxruntime build (it has {available_backends()})")
    key = (path, backend)
    if key not in _embedders:
        from sdk.embedder import Embedder

        _embedders[key] = Embedder(path, providers=[backend], threads=THREADS)
    return _embedders[key]


# Runners of one (modality, batch) run back to back, so their ratio sees the same machine load.
RUNNERS = [f"{p}-{b}" for b in BACKENDS for p in ENGINE_VARS] + ["teacher"]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("modality", MODALITIES)
def test_embed(benchmark, request, products, teacher_vectors, modality, batch, runner):
    call = modality_call(modality, products, batch)
    benchmark.group = f"{modality}, batch {batch}"
    if runner == "teacher":
        teacher = request.getfixturevalue("teacher")
        threads = request.getfixturevalue("teacher_threads")
        v = benchmark(teacher.embed, **call, batch_size=batch)
        record(benchmark, batch, runner="torch eager fp32 (teacher)", kind="teacher", precision="fp32",
               backend="torch", modality=modality, batch=batch, threads=threads)
        # The cached vectors came from one batch of 32: padding may move the last digits.
        check_fidelity(benchmark, v, teacher_vectors[modality][:batch], min_mean=0.9999, min_min=0.999,
                       against="FP32 teacher")
        return
    precision, backend = runner.rsplit("-", 1)
    emb = _embedder(precision, backend)
    v = benchmark(emb.embed, **call, batch_size=batch)
    record(benchmark, batch, runner=f"moon3 {precision} ({backend})", kind="engine", precision=emb.precision,
           backend=emb.backend, modality=modality, batch=batch, threads=THREADS)
    assert v.shape == (batch, emb.dim)
    check_fidelity(benchmark, v, teacher_vectors[modality][:batch], against="FP32 teacher")


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("modality, batch", [("text", 1), ("image+text", 32)])
@pytest.mark.parametrize("precision", list(ENGINE_VARS))
def test_cold_start(benchmark, products, teacher_vectors, tmp_path, precision, modality, batch, cache):
    """A fresh `python` per round: import sdk, load the engine, embed once (cold), embed again (warm).

    `cache`: the engine file evicted from the page cache before each round (read from disk), or
    read whole before it (a warm restart); `sdk.bench.probe_process`. The benchmark's own time is
    the whole process (interpreter start and exit included); extra_info holds the in-process split,
    the engine's page-cache fraction at the start and the peak RSS.
    """
    path = engine_from_env(ENGINE_VARS[precision])
    from sdk.bench import probe_process

    call = modality_call(modality, products, batch)
    out = tmp_path / "v.npy"
    runs: list[dict] = []
    benchmark.group = f"cold start (fresh process, engine {cache} in the page cache)"

    def probe():
        runs.append(probe_process(path, call, batch, threads=THREADS, out=out, cache=cache))

    benchmark.pedantic(probe, rounds=3, iterations=1, warmup_rounds=1)  # the warm-up run loads the libraries
    runs = runs[1:] or runs  # (one run only under --benchmark-disable)
    med = {k: float(np.median([r[k] for r in runs])) for k in
           ("cold_start_s", "import_s", "ort_import_s", "load_s", "first_embed_s", "warm_embed_s", "peak_rss_mb",
            "process_s")}
    fractions = [r["engine_cached_fraction"] for r in runs if r["engine_cached_fraction"] is not None]
    record(benchmark, batch, runner=f"moon3 {precision} (cpu)", kind="cold-start",
           precision=runs[0]["precision"], backend=runs[0]["backend"], modality=modality, batch=batch,
           threads=THREADS, cache=cache, engine_cached_fraction=max(fractions) if fractions else None, **med)
    check_fidelity(benchmark, np.load(out), teacher_vectors[modality][:batch], against="FP32 teacher")
