"""The distilled student engine against the teacher engine, same inputs, same run.

    moon3 build --out moon3.engine --no-reasoner                                   # teacher, INT8
    # the weights first (not in the repository): see sdk/train/weights/student/MODEL_CARD.md
    moon3 build --weights sdk/train/weights/student --out student.engine --no-reasoner  # student, INT8
    MOON3_ENGINE=moon3.engine MOON3_STUDENT_ENGINE=student.engine \
        .venv/bin/python -m pytest benchmarks/test_bench_student.py --benchmark-group-by=group

Per modality (photo + title, title, photo) and batch 1 / 8, the teacher engine and the student
engine run back to back; the student's record holds its latency ratio to the teacher
(`student_vs_teacher`, of the medians and of the minima). The target (issue: distill) is at most
0.5x the teacher's latency at >= 97% of its R@10 (the recall side is in the student's model card).
Correctness: the teacher engine's vectors against the FP32 teacher (cosine), the student
engine's against its own FP32 model (`ReferenceEmbedder` on the student weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from bench_common import MODALITIES, ROOT, THREADS, check_fidelity, engine_from_env, modality_call, record

BATCHES = (1, 8)
_timed: dict = {}
_embedders: dict = {}


def _engine(var: str):
    path = engine_from_env(var)
    if path not in _embedders:
        from sdk.embedder import Embedder

        _embedders[path] = Embedder(path, threads=THREADS)
    return _embedders[path]


@pytest.fixture(scope="module")
def student_reference(products):
    """FP32 vectors of the student's own PyTorch model per modality (first 8 products)."""
    pytest.importorskip("torch", reason="the student's FP32 model needs moon3-sdk[export]")
    from sdk.train.reference import ReferenceEmbedder

    weights = Path(os.environ.get("MOON3_STUDENT_WEIGHTS", ROOT / "sdk" / "train" / "weights" / "student"))
    if not (weights / "embedder.safetensors").is_file():
        pytest.skip(f"no student weights in {weights} (MOON3_STUDENT_WEIGHTS; the students' weights are not in the "
                    f"repository: their model cards restore or retrain them)")
    ref = ReferenceEmbedder(weights)
    return {m: ref.embed(**modality_call(m, products, max(BATCHES))) for m in MODALITIES}


@pytest.mark.parametrize("runner", ("teacher", "student"))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("modality", MODALITIES)
def test_student_vs_teacher(benchmark, request, products, teacher_vectors, modality, batch, runner):
    call = modality_call(modality, products, batch)
    benchmark.group = f"student: {modality}, batch {batch}"
    emb = _engine("MOON3_ENGINE" if runner == "teacher" else "MOON3_STUDENT_ENGINE")
    v = benchmark(emb.embed, **call, batch_size=batch)
    record(benchmark, batch, runner=f"moon3 {runner}", kind=runner, modality=modality, batch=batch, threads=THREADS,
           precision=emb.manifest["embedder"].get("precision"))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        data = np.asarray(stats.stats.data, np.float64)
        _timed[(runner, modality, batch)] = (float(np.median(data)), float(data.min()))
        base = _timed.get(("teacher", modality, batch))
        if runner == "student" and base:
            benchmark.extra_info.update(student_vs_teacher=float(np.median(data)) / base[0],
                                        student_vs_teacher_min=float(data.min()) / base[1])
    if runner == "teacher":
        check_fidelity(benchmark, v, teacher_vectors[modality][:batch], min_mean=0.99, min_min=0.98, against="FP32 teacher")
    else:
        want = request.getfixturevalue("student_reference")[modality][:batch]
        check_fidelity(benchmark, v, want, min_mean=0.99, min_min=0.98, against="the student's FP32 model")
