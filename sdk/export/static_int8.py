"""The build's calibrated INT8: where the calibration titles and photos come from, the static
Q/DQ candidates of the text graph (the sublayers most sensitive to quantization back to FP32
first), and the static INT8 image convolutions (a sensitivity sweep, then a ladder of candidates
gated end to end with the passing text graph)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..paths import CALIB, SAMPLES
from .gates import measure_engine
from .quantize import quantize_int8, text_layer_groups

if TYPE_CHECKING:
    from .build_config import BuildConfig

# Image-convolution candidates: the k convolutions most sensitive to static INT8 (each measured
# alone) stay FP32; the first k whose engine passes the gates wins, else every convolution stays FP32.
IMAGE_CONV_LADDER = (0, 2, 4, 8, 16)

IMAGE_SWEEP_MIN_COSINE = 0.98  # image-token cosine a candidate needs before it is gated end to end


def text_calibration(cfg: BuildConfig, tokenizer_path: Path):
    """The text calibration set: titles from `calibration_root`."""
    from sdk.calib import CalibrationSet

    return CalibrationSet.text_from_catalog(Path(calibration_root(cfg)), tokenizer_path, n=cfg.calib_items)


def calibration_root(cfg: BuildConfig) -> Path:
    """Where the build's text calibration titles come from (see `BuildConfig.calib_titles`)."""
    if cfg.catalog:
        return Path(cfg.catalog)
    if cfg.calib_titles is not None:
        return Path(cfg.calib_titles)
    repo = Path(cfg.samples).resolve() == SAMPLES.resolve()
    return CALIB if repo and (CALIB / "items.jsonl").is_file() else Path(cfg.samples)


def static_text_candidates(folded: Path, scopes: dict[str, str], tokenizer_path: Path, cfg: BuildConfig, tmp: Path, log):
    """Static INT8 candidates: the sublayers most sensitive to quantization return to FP32 first."""
    from sdk.calib import sensitivity_sweep

    cal = text_calibration(cfg, tokenizer_path)
    log(f"[3/4] calibrate: {cfg.calib_method} on {cal.source}; sensitivity of each text sublayer alone")
    groups = text_layer_groups(scopes)

    def mean_tokens(y, feed):  # token states -> masked mean per title (what the head pools)
        m = feed["attention_mask"][..., None].astype(np.float64)
        return (y * m).sum(1) / np.maximum(m.sum(1), 1.0)

    ranking = sensitivity_sweep(folded, groups, cal, tmp / "sweep", method=cfg.calib_method,
                                cache=tmp / "text.calib.json", reduce=mean_tokens, log=log)
    out = []
    for k in sorted({0, 1, 2, 4, 8, 12, len(ranking)}):
        if k <= len(ranking):
            keep = [name for name, _ in ranking[:k]]
            label = ("all static" if not k else "text graph fp32" if k == len(ranking)
                     else f"{k} most sensitive fp32 ({', '.join(keep)})")
            out.append((label, sorted(n for g in keep for n in groups[g])))
    return out


def quantize_static_text(folded: Path, dst: Path, exclude: list[str], tmp: Path, cfg: BuildConfig) -> Path:
    """Static Q/DQ INT8 of the text graph with `exclude` kept FP32 (the calibration cached in `tmp`)."""
    from sdk.calib import quantize_static_qdq

    return quantize_static_qdq(folded, dst, None, method=cfg.calib_method, exclude=exclude, cache=tmp / "text.calib.json")


def image_conv_candidates(folded: Path, cfg: BuildConfig, image_pre, tmp: Path,
                           log) -> tuple[Iterator[tuple[str, list[str], float, Path]], list[tuple[str, float]]]:
    """Static INT8 candidates for the image tower's convolutions: a sensitivity sweep (each
    convolution quantized alone, image-token cosine to FP32 on the calibration photos), then one
    candidate per `IMAGE_CONV_LADDER` step with the k most sensitive kept FP32.

    Returns:
        (candidates, ranking): an iterator of (label, FP32 convolution names, image-token cosine,
        the candidate's Q/DQ graph) per ladder step, fewest FP32 convolutions first, each
        quantized and measured only when the iteration reaches it (the gate stops at the first
        that passes); and (convolution, image-token cosine quantized alone), most sensitive first.
    """
    import onnx

    from sdk.calib import CalibrationSet, output_cosine, quantize_static_qdq, sensitivity_sweep

    root = Path(cfg.catalog or cfg.samples)
    cal = CalibrationSet.image_from_catalog(root, n=cfg.calib_images, image=image_pre)
    convs = [n.name for n in onnx.load(str(folded), load_external_data=False).graph.node if n.op_type == "Conv"]
    log(f"[3/4] image convolutions: {cfg.calib_method} calibration on {cal.source}; sensitivity of each of "
        f"{len(convs)} convolutions alone")
    quant = dict(method=cfg.calib_method, cache=tmp / "image.calib.json", op_types=["Conv"], symmetric=False)
    ranking = sensitivity_sweep(folded, {c: [c] for c in convs}, cal, tmp / "image.sweep", log=lambda *_: None, **quant)
    worst = ", ".join(f"{n} {c:.4f}" for n, c in ranking[:4])
    log(f"      most sensitive: {worst}")

    def candidates():
        for k in IMAGE_CONV_LADDER:
            if k >= len(convs):
                return
            keep = [name for name, _ in ranking[:k]]
            dst = quantize_static_qdq(folded, tmp / f"image.qdq.{k}.onnx", None, exclude=keep, **quant)
            cos = output_cosine(folded, dst, cal.feeds)
            label = f"image convolutions int8, {k} most sensitive fp32" if k else "image convolutions all int8"
            log(f"      {label}: image-token cosine {cos:.5f}")
            yield label, keep, cos, dst

    return candidates(), ranking


def gate_image_convs(folded: Path, fallback: Path, package, report: dict, teacher_views: dict, products,
                      image_pre, cfg: BuildConfig, tmp: Path, log) -> tuple[Path, dict]:
    """Gate the image-convolution candidates end to end with the passing text graph.

    Args:
        folded: the constant-folded FP32 image graph; fallback: the image graph that passed
            (convolutions FP32, matmuls dynamic INT8); package: image graph -> candidate engine.
        report: the passing fidelity report of `fallback`.

    Returns:
        (image graph, its fidelity report): the first candidate that passes, else `fallback`;
        the report's "image_candidates_tried" lists every candidate gated and why it lost.
    """
    tried = []
    candidates, ranking = image_conv_candidates(folded, cfg, image_pre, tmp, log)
    sensitivity = [[name, round(cos, 6)] for name, cos in ranking]
    for n, (label, keep, cos, static) in enumerate(candidates, 1):
        if cos < IMAGE_SWEEP_MIN_COSINE:  # too far off to be worth a gate run
            tried.append({"candidate": label, "fp32_convolutions": keep, "image_token_cosine": round(cos, 6),
                          "passed": False, "failed": [f"not gated: image-token cosine {cos:.4f} < "
                                                      f"{IMAGE_SWEEP_MIN_COSINE}"]})
            continue
        # + the matmuls dynamic INT8, as before
        image = quantize_int8(static, tmp / f"image.cand.{n}.int8.onnx", activations=cfg.int8_activations)
        log(f"[4/4] fidelity: {label} (image-token cosine {cos:.5f}), through sdk.Embedder vs the FP32 teacher")
        rep = measure_engine(package(image), teacher_views, products, cfg.gates, cfg.threads, log)
        tried.append({"candidate": label, "fp32_convolutions": keep, "image_token_cosine": round(cos, 6),
                      "passed": rep["passed"], "failed": rep["failed"]})
        if rep["passed"]:
            rep.update(image_candidates_tried=tried, image_convolutions=label, image_sensitivity=sensitivity)
            return image, rep
    log("      no image-convolution candidate passed: the convolutions stay FP32")
    report.update(image_candidates_tried=tried, image_convolutions="fp32 (no INT8 candidate passed)",
                  image_sensitivity=sensitivity)
    return fallback, report
