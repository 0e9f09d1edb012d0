"""Catalog throughput: photo + title items/s with JPEG decode included, the default engine against
the plain pipeline a user would write around the same model exported to FP32 ONNX.

    MOON3_ENGINE=moon3.engine MOON3_ENGINE_SINGLE_FP32=moon3-fp32-single.engine \
        .venv/bin/python -m pytest benchmarks/test_bench_catalog.py --benchmark-json=catalog.json

The plain pipeline (`PlainPipeline`): PIL decode and resize (`sdk.preprocess`, the same
preprocessing, so the vectors are comparable), the Hugging Face tokenizer with padding, and one
onnxruntime session of the whole FP32 embedder graph (`moon3 build --precision fp32 --layout
single`: the teacher exported as one graph, what `torch.onnx.export` of the model gives), fed in
batches. The engine: `sdk.Embedder.embed` on the same photo paths and titles. Each timed call
embeds CATALOG_ITEMS sample products in batches of 1, 8 or 32, with 1 and 2 threads per runner;
runners of one (batch, threads) run back to back. Every call's vectors are checked against the
FP32 teacher's. `benchmarks/report.py` turns the rows into the items/s table, the target (engine
÷ plain pipeline at batch 32) and `catalog_throughput.png` (items/s against batch, per thread count).
"""

from __future__ import annotations

import numpy as np
import pytest
from bench_common import check_fidelity, engine_from_env, record

CATALOG_ITEMS = 32
THREAD_COUNTS = (1, 2)
CATALOG_BATCHES = (1, 8, 32)


class PlainPipeline:
    """Photos + titles -> vectors with PIL, tokenizers and one FP32 onnxruntime session."""

    def __init__(self, engine_path, threads: int):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from sdk.contract import SINGLE_PART, read_embedder_spec
        from sdk.engine import EngineFile

        engine = EngineFile.read(engine_path)
        spec = read_embedder_spec(engine.manifest, engine_path)
        if spec.layout != "single" or spec.precision != "fp32":
            pytest.skip(f"{engine_path}: the plain pipeline needs a one-graph FP32 engine "
                        "(moon3 build --precision fp32 --layout single), got "
                        f"layout {spec.layout}, precision {spec.precision}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(engine.part(SINGLE_PART), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_str(engine.part(spec.text_tokenizer).decode("utf-8"))
        self.tokenizer.enable_truncation(spec.text_max_length)
        self.tokenizer.enable_padding()
        self.image = spec.image
        self.output = spec.output

    def embed(self, photos, titles, batch_size: int) -> np.ndarray:
        from sdk.preprocess import image_to_array, load_image

        out = []
        for s in range(0, len(photos), batch_size):
            ps, ts = photos[s:s + batch_size], titles[s:s + batch_size]
            pixels = np.stack([image_to_array(load_image(p), self.image) for p in ps])
            enc = self.tokenizer.encode_batch(ts)
            B = len(ps)
            feed = {"pixels": pixels,
                    "input_ids": np.array([e.ids for e in enc], np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                    "trace_ids": np.zeros((B, 1), np.int64), "trace_mask": np.zeros((B, 1), np.int64),
                    "present": np.tile(np.array([[1.0, 1.0, 0.0]], np.float32), (B, 1))}
            out.append(self.session.run([self.output], feed)[0])
        return np.concatenate(out)


_runners: dict = {}


def _runner(kind: str, threads: int):
    key = (kind, threads)
    if key not in _runners:
        if kind == "engine":
            from sdk.embedder import Embedder

            _runners[key] = Embedder(engine_from_env("MOON3_ENGINE"), threads=threads)
        else:
            _runners[key] = PlainPipeline(engine_from_env("MOON3_ENGINE_SINGLE_FP32"), threads)
    return _runners[key]


@pytest.mark.parametrize("runner", ["engine", "plain"])
@pytest.mark.parametrize("threads", THREAD_COUNTS)
@pytest.mark.parametrize("batch", CATALOG_BATCHES)
def test_catalog(benchmark, products, teacher_vectors, batch, threads, runner):
    photos = [p for p, _ in products[:CATALOG_ITEMS]]
    titles = [t for _, t in products[:CATALOG_ITEMS]]
    benchmark.group = f"catalog photo + title, {CATALOG_ITEMS} items, batch {batch}, {threads} threads"
    r = _runner(runner, threads)
    if runner == "engine":
        v = benchmark(r.embed, images=photos, texts=titles, batch_size=batch)
        name, precision = "moon3 engine", r.precision
    else:
        v = benchmark(r.embed, photos, titles, batch)
        name, precision = "plain pipeline (PIL + FP32 onnxruntime)", "fp32"
    record(benchmark, CATALOG_ITEMS, runner=name, kind="catalog", precision=precision, modality="image+text",
           batch=batch, threads=threads)
    check_fidelity(benchmark, v, teacher_vectors["image+text"][:CATALOG_ITEMS], against="FP32 teacher")
