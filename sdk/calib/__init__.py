"""Calibration sets, calibrators, SmoothQuant, and static INT8 (Q/DQ) quantization with a sensitivity sweep.

    from sdk.calib import CalibrationSet, quantize_static_qdq, sensitivity_sweep, smooth_matmul_inputs
    cal = CalibrationSet.text_from_catalog("../shared/data/catalog", "tokenizer.json", n=256)
    quantize_static_qdq("text.onnx", "text.qdq.onnx", cal, method="percentile", cache="text.calib.json")
    smooth_matmul_inputs("text.onnx", "text.smoothed.onnx", cal, alpha=0.7)  # then dynamic INT8

A calibration set is any list of named numpy feeds (dicts keyed by the graph's input names);
`CalibrationSet.text_from_catalog` / `image_from_catalog` draw one from a catalog, stratified by
article type (round robin over types, so rare categories are represented), preprocessed exactly
as the runtime does (`sdk.preprocess`). Calibrators are onnxruntime's (min-max, entropy,
percentile); the computed ranges are cached in a JSON file, so the candidates of a sweep are
quantized without calibrating again. Q/DQ with symmetric INT8 activations and per-channel weights
is the explicit-quantization format TensorRT builds INT8 plans from.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from sdk.train.catalog import catalog_records, stratified_records

METHODS = ("minmax", "entropy", "percentile")


@dataclass
class CalibrationSet:
    """Named numpy feeds for one graph, plus where they came from."""

    feeds: list[dict[str, np.ndarray]]
    source: str = "given"
    ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.feeds:
            raise ValueError("a calibration set needs at least one feed")
        names = set(self.feeds[0])
        for k, f in enumerate(self.feeds):
            if set(f) != names:
                raise ValueError(f"feed {k} has inputs {sorted(f)}, feed 0 has {sorted(names)}")

    def __len__(self) -> int:
        return len(self.feeds)

    stratified = staticmethod(stratified_records)  # (sdk.train.catalog's draw)

    @classmethod
    def text_from_catalog(cls, root: str | Path, tokenizer_json: str | Path, *, n: int = 256, batch: int = 16,
                          max_length: int = 32, seed: int = 0, train_only: bool = True) -> "CalibrationSet":
        """Title feeds (input_ids, attention_mask) for a text graph.

        Every feed has the same shape (batch, max_length): onnxruntime's histogram calibrators
        (entropy, percentile) stack the batches, so the titles are padded to max_length and a
        last partial batch is dropped.
        """
        from sdk.preprocess import TextTokenizer

        records = catalog_records(root, train_only)
        picked = cls.stratified(records, n, seed)
        picked = picked[: max(batch, len(picked) - len(picked) % batch)]
        tok = TextTokenizer(str(tokenizer_json), max_length)
        feeds = []
        for i in range(0, len(picked), batch):
            ids, mask = tok([r["title"] for r in picked[i : i + batch]])
            pad = ((0, 0), (0, max_length - ids.shape[1]))
            feeds.append({"input_ids": np.pad(ids, pad), "attention_mask": np.pad(mask, pad)})
        return cls(feeds, f"{root} ({len(picked)} titles, stratified)", [int(r["id"]) for r in picked])

    @classmethod
    def image_from_catalog(cls, root: str | Path, *, n: int = 64, batch: int = 8, seed: int = 0,
                           train_only: bool = True, image=None) -> "CalibrationSet":
        """Photo feeds (pixels) for an image graph, all of one batch size (a last partial batch is
        dropped); products without a readable photo are skipped."""
        from sdk.errors import InvalidInputError
        from sdk.preprocess import ImagePreprocess, image_to_array, load_image

        image = image or ImagePreprocess()
        root = Path(root)
        records = [r for r in catalog_records(root, train_only) if r.get("image")]
        pix, ids = [], []
        for r in cls.stratified(records, n, seed):
            try:
                pix.append(image_to_array(load_image(root / r["image"]), image))
                ids.append(int(r["id"]))
            except InvalidInputError:
                continue
        keep = max(batch, len(pix) - len(pix) % batch)
        pix, ids = pix[:keep], ids[:keep]
        feeds = [{"pixels": np.stack(pix[i : i + batch])} for i in range(0, len(pix), batch)]
        return cls(feeds, f"{root} ({len(pix)} photos, stratified)", ids)


def feeds_reader(feeds: Sequence[Mapping[str, np.ndarray]]):
    """onnxruntime's CalibrationDataReader over a list of named feeds (rewindable)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Feeds(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

        def __len__(self):
            return len(feeds)

        def set_range(self, start_index: int, end_index: int):
            self._it = iter(list(feeds)[start_index:end_index])

    return _Feeds()


def quantize_static_qdq(src: str | Path, dst: str | Path, calibration: CalibrationSet | None, *,
                        method: str = "minmax", exclude: Iterable[str] = (), cache: str | Path | None = None,
                        op_types: Sequence[str] = ("MatMul", "Gemm"), percentile: float = 99.999,
                        symmetric: bool = True) -> Path:
    """Static INT8 Q/DQ: INT8 activations (ranges from `calibration`), per-channel symmetric INT8 weights.

    Args:
        src: the FP32 graph (run `sdk.export.quantize.fold_constants` first); dst: output path.
        calibration: feeds to calibrate on; may be None when `cache` already holds the ranges.
        method: "minmax", "entropy" or "percentile" (onnxruntime's calibrators).
        exclude: node names kept in FP32.
        cache: JSON file of the computed ranges (written on the first call, reused after).
        op_types: op types to quantize.
        percentile: the percentile of |activation| kept by the "percentile" method.
        symmetric: symmetric signed INT8 activations (TensorRT's format); False: asymmetric
            unsigned INT8 (ONNX Runtime's CPU kernels; no range wasted on the negative half
            after a ReLU6).

    Raises:
        ValueError: an unknown method, or neither calibration nor a cache.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if calibration is None and not (cache and Path(cache).is_file()):
        raise ValueError("give a calibration set or an existing calibration cache")
    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}[method]
    extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if method == "percentile":
        extra.update(CalibPercentile=percentile, CalibTensorRangeSymmetric=symmetric)
    quantize_static(
        str(src), str(dst), None if calibration is None else feeds_reader(calibration.feeds),
        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types), per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
        calibrate_method=cm, extra_options=extra, calibration_cache_path=None if cache is None else str(cache),
    )
    return Path(dst)


def output_cosine(reference: str | Path, candidate: str | Path, feeds: Sequence[Mapping[str, np.ndarray]],
                  reduce: Callable[[np.ndarray, Mapping[str, np.ndarray]], np.ndarray] | None = None) -> float:
    """Mean cosine between two graphs' first outputs over feeds (each output reduced to one
    vector per item by `reduce`, default: flatten)."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
    reduce = reduce or (lambda y, _f: y.reshape(y.shape[0], -1))
    cos = []
    for f in feeds:
        ya, yb = (reduce(s.run(None, dict(f))[0], f).astype(np.float64) for s in (a, b))
        den = np.linalg.norm(ya, axis=1) * np.linalg.norm(yb, axis=1)
        cos.append((ya * yb).sum(1) / np.where(den > 0, den, 1.0))
    return float(np.concatenate(cos).mean())


def sensitivity_sweep(src: str | Path, groups: Mapping[str, Sequence[str]], calibration: CalibrationSet,
                      work: str | Path, *, method: str = "minmax", cache: str | Path | None = None,
                      reduce=None, log=print, **quant) -> list[tuple[str, float]]:
    """Quantize one node group at a time and measure the output cosine against FP32.

    Args:
        src: the FP32 graph; groups: group name -> node names (e.g. one per transformer sublayer).
        calibration: feeds for calibration and for the measurement.
        quant: more `quantize_static_qdq` settings (op_types, symmetric, percentile).

    Returns:
        (group, cosine) pairs, most sensitive (lowest cosine) first.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    everything = {n for names in groups.values() for n in names}
    out = []
    for k, (name, nodes) in enumerate(groups.items()):
        dst = work / f"sweep.{k}.onnx"
        quantize_static_qdq(src, dst, calibration, method=method, exclude=sorted(everything - set(nodes)), cache=cache,
                            **quant)
        cos = output_cosine(src, dst, calibration.feeds, reduce)
        log(f"      sensitivity {name:40s} cosine {cos:.6f}")
        out.append((name, cos))
        dst.unlink(missing_ok=True)
    return sorted(out, key=lambda t: t[1])


SMOOTH_ALPHA = 0.7  # the migration strength that kept MiniLM's title vectors closest to FP32 (0.6-0.9 tried)


def smooth_matmul_inputs(src: str | Path, dst: str | Path, calibration: CalibrationSet, *,
                         alpha: float = SMOOTH_ALPHA) -> dict:
    """SmoothQuant for dynamic INT8: move activation outliers into the weights, output unchanged.

    For every MatMul with a constant 2-D weight W (K, N), grouped by input x (the Q, K and V
    projections share one), the input channels are rescaled: x' = x / s and W' = s * W (rows),
    with s_k = max|x_k|^alpha / max|W_k|^(1 - alpha) (max|x_k| over the calibration feeds, max|W_k|
    over every weight of the group). In FP32 the graph computes the same thing (one Mul per group is
    added); dynamic per-tensor INT8 of x' then loses far less to the few channels that carry
    outliers (Xiao et al., SmoothQuant, 2023). A weight shared with another node is left alone.

    Args:
        src: a constant-folded FP32 graph; dst: output path; calibration: feeds for `src`;
        alpha: migration strength in [0, 1] (0: all to the activations, 1: all to the weights).

    Returns:
        {"alpha", "groups": number of rescaled inputs, "matmuls": number of rescaled MatMuls,
         "calibration": the set's source}.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    model = onnx.load(str(src))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = defaultdict(int)
    for n in g.node:
        for i in n.input:
            uses[i] += 1
    groups: dict[str, list] = defaultdict(list)
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 and uses[n.input[1]] == 1:
            groups[n.input[0]].append(n)
    probe = onnx.load(str(src))
    probe.graph.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in groups)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the probed values
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    amax: dict[str, np.ndarray] = {}
    for feed in calibration.feeds:
        for name, y in zip(names, sess.run(None, dict(feed))):
            if name in groups:
                a = np.abs(y.reshape(-1, y.shape[-1])).max(0)
                amax[name] = np.maximum(amax[name], a) if name in amax else a
    first = {}
    for k, n in enumerate(g.node):
        if n.input and n.input[0] in groups:
            first.setdefault(n.input[0], k)
    inserts = []
    for x, nodes in groups.items():
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)  # (K,)
        s = np.clip(np.maximum(amax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1.0 - alpha), 1e-3, 1e3)
        s = s.astype(np.float32)
        inv = f"{x}/smooth_inv"
        g.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        inserts.append((first[x], helper.make_node("Mul", [x, inv], [f"{x}/smoothed"], name=f"{x}/smooth")))
        for n, w in zip(nodes, ws):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
            n.input[0] = f"{x}/smoothed"
    for k, node in sorted(inserts, key=lambda t: t[0], reverse=True):  # before each group's first reader
        g.node.insert(k, node)
    onnx.save(model, str(dst))
    return {"alpha": alpha, "groups": len(groups), "matmuls": sum(len(v) for v in groups.values()),
            "calibration": calibration.source}
