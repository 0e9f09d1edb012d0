"""Would static INT8 convolutions pay for the image tower? Fidelity and speed of EfficientNet's
convolutions quantized by ONNX Runtime, on an FP32 engine's image graph.

    moon3 build --precision fp32 --no-reasoner --out fp32.engine
    .venv/bin/python benchmarks/probe_int8_convs.py fp32.engine --catalog ../shared/data/catalog

For each variant (Q/DQ or QOperator format; all convolutions, or all but the depthwise ones):
per-channel INT8 weights, unsigned INT8 activations calibrated (min-max) on 64 train-split photos;
then, on 96 other photos, the cosine of the image tokens to the FP32 graph's (per photo, all tokens
flattened, and per token) and the batch-1 latency ratio (one thread, median of 15). Only the
convolutions are quantized; the image encoder's matmuls stay FP32 here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _cosines(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def cos(a, b):
        return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)

    n, d = len(ref), ref.shape[-1]
    return cos(ref.reshape(n, -1), got.reshape(n, -1)), cos(ref.reshape(-1, d), got.reshape(-1, d))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", help="an FP32 split engine (moon3 build --precision fp32)")
    ap.add_argument("--catalog", required=True, help="catalog folder (calibration and evaluation photos)")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from sdk.calib import CalibrationSet, feeds_reader
    from sdk.engine import EngineFile

    work = Path(tempfile.mkdtemp(prefix="moon3-int8conv-"))
    eng = EngineFile.open(args.engine)
    src, pre = work / "image_fp32.onnx", work / "image_pre.onnx"
    src.write_bytes(eng.part(eng.manifest["embedder"]["parts"]["image"]))
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    cal = CalibrationSet.image_from_catalog(args.catalog, n=64, batch=8)
    ev = CalibrationSet.image_from_catalog(args.catalog, n=96, batch=8, seed=7, train_only=False)
    nodes = onnx.load(str(pre)).graph.node
    depthwise = [n.name for n in nodes if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    print(f"{sum(n.op_type == 'Conv' for n in nodes)} convolutions, {len(depthwise)} depthwise")

    def session(path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def latency_ms(sess, x):
        for _ in range(3):
            sess.run(None, {"pixels": x})
        times = []
        for _ in range(15):
            t = time.perf_counter()
            sess.run(None, {"pixels": x})
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1e3

    ref = session(pre)
    refs = [ref.run(None, f)[0] for f in ev.feeds]
    x1 = ev.feeds[0]["pixels"][:1]
    base = latency_ms(ref, x1)
    print(f"fp32: batch 1 {base:.2f} ms")
    variants = {
        "Q/DQ, all convolutions": (QuantFormat.QDQ, []),
        "Q/DQ, all but depthwise": (QuantFormat.QDQ, depthwise),
        "QOperator, all convolutions": (QuantFormat.QOperator, []),
        "QOperator, all but depthwise": (QuantFormat.QOperator, depthwise),
    }
    for k, (name, (fmt, exclude)) in enumerate(variants.items()):
        dst = work / f"variant{k}.onnx"
        quantize_static(str(pre), str(dst), feeds_reader(cal.feeds), quant_format=fmt, op_types_to_quantize=["Conv"],
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax)
        sess = session(dst)
        per_item, per_token = map(np.concatenate, zip(*(_cosines(r, sess.run(None, f)[0])
                                                        for f, r in zip(ev.feeds, refs))))
        t = latency_ms(sess, x1)
        print(f"{name}: photo cosine mean {per_item.mean():.4f} min {per_item.min():.4f}; token cosine mean "
              f"{per_token.mean():.4f} min {per_token.min():.4f}; batch 1 {t:.2f} ms ({t / base:.2f}x)")


if __name__ == "__main__":
    main()
