"""Fixtures of the benchmark suites: real sample inputs and the FP32 teacher's vectors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from bench_common import BATCHES, CACHE, MODALITIES, ROOT, SAMPLES, THREADS, fastest_torch_threads, modality_call, tree_clean


def pytest_collection_modifyitems(items):
    # Peer libraries warn about their own deprecations; a benchmark is not the place to fail on them
    # (the project's tests keep filterwarnings=error).
    for item in items:
        item.add_marker(pytest.mark.filterwarnings("default"))


@pytest.fixture(scope="session")
def products() -> list[tuple[Path, str]]:
    """(photo, title) of the sample products that have a photo, in file order."""
    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    return [(SAMPLES / it["image"], it["title"]) for it in items if it["image"]]


@pytest.fixture(scope="session")
def teacher():
    """The FP32 PyTorch teacher (eager), or a skip when the toolchain is not installed."""
    pytest.importorskip("torch", reason="the FP32 teacher needs moon3-sdk[export]")
    try:
        from sdk.train.reference import ReferenceEmbedder

        return ReferenceEmbedder()
    except Exception as exc:  # noqa: BLE001 - a missing tower package is a skip, not a failure
        pytest.skip(f"the FP32 teacher cannot be loaded here ({type(exc).__name__}: {exc})")


@pytest.fixture(scope="session")
def teacher_threads(teacher, products) -> int:
    """torch's thread count for the teacher: the faster of 1 and THREADS on one photo + title."""
    call = modality_call("image+text", products, 1)
    return fastest_torch_threads(lambda: teacher.embed(**call, batch_size=1))


@pytest.fixture(scope="session")
def teacher_vectors(request, products):
    """FP32 teacher vectors: modality -> (32, 256) for the first 32 sample products, and
    "titles" -> (N, 256) for every product's title alone (the text-only throughput workload).

    Computed with the teacher where it loads and cached in .cache/bench/teacher_vectors.npz, so a
    venv without the toolchain (benchmarks/peers-venv) checks the engine against the same vectors.
    """
    n = max(BATCHES)
    # The inputs plus everything that makes the teacher's vectors: weights, model and preprocessing code.
    digest = hashlib.sha256()
    for f in sorted((ROOT / "sdk" / "train" / "weights").glob("embedder*")) + [
        *(ROOT / "sdk" / "train" / name for name in ("reference.py", "fusion_model.py", "towers.py")),
        ROOT / "sdk" / "preprocess.py",
    ]:
        if f.is_file():
            digest.update(f.read_bytes())
    key = json.dumps([digest.hexdigest(), [[str(p.relative_to(ROOT)), t] for p, t in products]])
    path = CACHE / "teacher_vectors.npz"
    if path.is_file():
        z = np.load(path)
        if str(z["key"]) == key:
            return {k: z[k] for k in (*MODALITIES, "titles")}
    ref = request.getfixturevalue("teacher")
    out = {m: ref.embed(**modality_call(m, products, n), batch_size=n) for m in MODALITIES}
    out["titles"] = ref.embed(texts=[t for _, t in products], batch_size=n)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, key=np.array(key), **out)
    return out


def pytest_benchmark_update_machine_info(config, machine_info):
    # A shared machine's load explains a noisy run: keep it with the results, with the tree's state
    # (uncommitted changes to tracked files make the figures not a committed state's) and how much
    # of each engine file was in the page cache when the run started.
    import os

    from sdk.pagecache import cached_fraction

    machine_info["loadavg_at_start"] = list(os.getloadavg())
    machine_info["bench_threads"] = THREADS
    machine_info["tree_clean"] = tree_clean()
    machine_info["engines_page_cached"] = {
        var: cached_fraction(os.environ[var]) for var in sorted(os.environ)
        if var.startswith("MOON3_ENGINE") and Path(os.environ[var]).is_file()}
    cpuinfo = Path("/proc/cpuinfo")
    machine_info["avx512_vnni"] = "avx512_vnni" in cpuinfo.read_text() if cpuinfo.exists() else None
