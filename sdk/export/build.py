"""Build `moon3.engine` from the trained reference embedder: export, quantize, gate, package.

    moon3 build --out moon3.engine --precision int8            # gates measured on data/samples
    moon3 build --out moon3.engine --catalog ../shared/data/catalog --eval-items 400

Steps: (1) the FP32 PyTorch graph (towers + committed fusion weights) is exported to one ONNX
graph and checked against PyTorch on padded mixed-length batches; (2) for int8 the graph's
MatMul/Gemm weights are quantized per channel with onnxruntime's dynamic quantizer, trying
`INT8_CANDIDATES` in order (each keeps more layer groups in FP32) until one passes; (3) the
candidate engine is loaded with the runtime (`sdk.Embedder`, exactly what users run) and
measured against the FP32 teacher on real products: cosine (mean, min) of photo+title,
photo-only and title-only vectors, and the text->image recall@10 delta; (4) gates decide, and
the report goes into the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..paths import WEIGHTS
from .build_config import AUTO_VIEWS, BuildConfig
from .gates import GateError, embed_views, eval_products, measure_engine
from .quantize import (
    FP16_KEEP_FP32,
    convert_fp16,
    fold_constants,
    int8_candidates,
    matmul_scopes,
    quantize_int8,
)
from .reasoner_build import reasoner_section
from .static_int8 import gate_image_convs, quantize_static_text, static_text_candidates, text_calibration


@dataclass
class _Teacher:
    """The FP32 teacher's vectors of the evaluation products, and what an engine copies from it."""

    products: list[tuple[Path, str]]
    views: dict[str, np.ndarray]
    dims: list[int]
    text_len: int
    image_pre: Any  # sdk.preprocess.ImagePreprocess: the photo size the fusion model was trained for
    trace_trained: bool


@dataclass
class _Graphs:
    """The exported FP32 graphs (the single layout's one graph is `text`), then the build's choices."""

    text: Path
    image: Path | None
    head: Path | None
    parity: dict
    folded_image: Path | None = None  # an int8 split build's constant-folded FP32 image graph


def _measure_teacher(cfg: BuildConfig, weights: Path, log) -> _Teacher:
    from sdk.train.reference import ReferenceEmbedder

    products = eval_products(cfg.catalog, cfg.samples, cfg.eval_items)
    log(f"[1/4] teacher: FP32 reference embedder on {len(products)} evaluation products")
    teacher = ReferenceEmbedder(weights)
    return _Teacher(products, embed_views(teacher.embed, products), list(teacher.model.cfg.matryoshka_dims),
                    teacher.tokenizer.max_length, teacher.preprocess,
                    bool(teacher.metrics.get("trace_trained", False)))


def _export_graphs(cfg: BuildConfig, weights: Path, image_pre, tmp: Path, log) -> _Graphs:
    from .onnx_embedder import OnnxExportConfig, build_reference_graph, export_embedder_onnx
    from .onnx_split import SplitExportConfig, export_split_onnx

    graph = build_reference_graph(weights)
    if cfg.layout == "split":
        log("[2/4] export: image graph + text graph + head, parity vs PyTorch on padded batches")
        # The static Q/DQ graph is TensorRT's format: the exporter's plain ops, no com.microsoft ones.
        paths = export_split_onnx(graph, SplitExportConfig(tmp / "split", image_size=image_pre.size,
                                                           fused_text=cfg.precision != "int8-static"))
        parity = json.loads((tmp / "split" / "split.parity.json").read_text())
        return _Graphs(paths["text"], paths["image"], paths["head"], parity)
    log("[2/4] export: one ONNX graph (towers + fusion), parity vs PyTorch on padded batches")
    path = export_embedder_onnx(graph, OnnxExportConfig(tmp / "embedder.onnx", image_size=image_pre.size))
    return _Graphs(path, None, None, json.loads(path.with_suffix(".parity.json").read_text()))


def _text_candidates(cfg: BuildConfig, graphs: _Graphs, tokenizer_path: Path, tmp: Path,
                     log) -> list[tuple[str, Callable[[int, int], Path]]]:
    """The text-graph candidates in the order the gates try them: (label, make(n, total) -> the
    candidate's text graph). Converts the split layout's image graph on the way (int8: matmuls
    dynamic INT8, once; fp16: FP16), in `graphs.image`."""
    if cfg.precision == "fp32":
        def fp32(n: int, total: int) -> Path:
            log("[3/4] quantize: skipped (fp32)")
            return graphs.text

        return [("fp32", fp32)]
    if cfg.precision == "fp16":  # split layout only (checked by BuildConfig)
        graphs.image = convert_fp16(fold_constants(graphs.image, tmp / "image.folded.onnx"), tmp / "image.fp16.onnx")

        def fp16(n: int, total: int) -> Path:
            log(f"[3/4] convert: FP16 weights and activations ({', '.join(FP16_KEEP_FP32)} in FP32; "
                "float32 inputs and outputs)")
            return convert_fp16(fold_constants(graphs.text, tmp / "text.folded.onnx"), tmp / "text.fp16.onnx")

        return [("fp16", fp16)]
    # The candidates name text-tower modules; in a split engine the image graph (its image-encoder
    # matmuls) is quantized once, whole, dynamically.
    scopes = matmul_scopes(graphs.text)
    folded = fold_constants(graphs.text, tmp / "text.folded.onnx")
    if cfg.layout == "split":
        graphs.folded_image = fold_constants(graphs.image, tmp / "image.folded.onnx")
        graphs.image = (graphs.folded_image if cfg.image_matmuls == "fp32" else
                        quantize_int8(graphs.folded_image, tmp / "image.int8.onnx", activations=cfg.int8_activations))
    sources: dict[str, Path] = {}  # candidate label -> the graph it quantizes, when not `folded`
    if cfg.precision == "int8":
        listed = int8_candidates(scopes, cfg.smooth_alpha)
        candidates = [(label, exclude) for label, exclude, _ in listed]
        if cfg.smooth_alpha is not None:
            from sdk.calib import smooth_matmul_inputs

            smoothed = tmp / "text.smoothed.onnx"
            smoothing = smooth_matmul_inputs(folded, smoothed, text_calibration(cfg, tokenizer_path), alpha=cfg.smooth_alpha)
            log(f"[3/4] SmoothQuant: {smoothing['matmuls']} text-graph matmuls rescaled "
                f"({smoothing['groups']} inputs, calibrated on {smoothing['calibration']})")
            sources = {label: smoothed for label, _, smooth in listed if smooth}
    else:
        candidates = static_text_candidates(folded, scopes, tokenizer_path, cfg, tmp, log)
    kind = "static Q/DQ" if cfg.precision == "int8-static" else "dynamic"

    def quantized(label: str, exclude: list[str]) -> Callable[[int, int], Path]:
        def make(n: int, total: int) -> Path:
            log(f"[3/4] quantize: INT8 {kind} per channel, candidate {n}/{total}: {label} "
                f"({len(exclude)} of {len(scopes)} text-graph matmuls fp32)")
            if cfg.precision == "int8":
                return quantize_int8(sources.get(label, folded), tmp / f"text.int8.{n}.onnx", exclude,
                                     activations=cfg.int8_activations)
            return quantize_static_text(folded, tmp / f"text.qdq.{n}.onnx", exclude, tmp, cfg)

        return make

    return [(label, quantized(label, exclude)) for label, exclude in candidates]


def _gate_text_candidates(cfg: BuildConfig, candidates, package, teacher: _Teacher, tmp: Path,
                          log) -> tuple[Path, dict, list[dict]]:
    """Package and gate each text-graph candidate in turn until one passes -> (its text graph, its
    fidelity report, every candidate tried); the last one when none passes."""
    tried = []
    for n, (label, make) in enumerate(candidates, 1):
        graph = make(n, len(candidates))
        candidate = package(tmp / "candidate.engine", graph)
        log("[4/4] fidelity: the candidate engine through sdk.Embedder vs the FP32 teacher")
        report = measure_engine(candidate, teacher.views, teacher.products, cfg.gates, cfg.threads, log)
        tried.append({"candidate": label, "passed": report["passed"], "failed": report["failed"],
                      "views": report["views"], "text->image R@10": report["text->image R@10"]})
        if report["passed"]:
            break
    return graph, report, tried


def _optional_sections(cfg: BuildConfig, weights: Path, tmp: Path, log) -> tuple[dict, dict, Path | None, Path | None]:
    """The reasoner and image-completion parts the engine carries -> (manifest sections, parts,
    reasoner folder, completion folder); a folder is None when its part is left out."""
    extra, extra_parts = {}, {}
    rdir = cfg.reasoner_dir()
    if rdir is not None:
        extra, extra_parts = reasoner_section(rdir, tmp / "reasoner", cfg, log)
    cdir = cfg.completion_dir()
    if cdir is not None:
        section, parts = _completion_section(cdir, weights, tmp / "completion", explicit=cfg.completion != "auto",
                                             log=log)
        if section is not None:
            extra, extra_parts = {**extra, "completion": section}, {**extra_parts, **parts}
        else:
            cdir = None
    return extra, extra_parts, rdir, cdir


def build_engine(cfg: BuildConfig, log=print) -> Path:
    """Build, measure and write the engine described by `cfg`.

    Returns:
        The engine path.

    Raises:
        GateError: a fidelity gate failed and cfg.enforce is True (nothing is written).
        ExportError: ONNX export or its parity check failed.
    """
    if cfg.precision == "auto":
        return build_auto(cfg, log)
    from sdk.train.towers import text_tower_path

    from .bundle import package_embedder, package_split_embedder
    from .trt_ops import parser_report

    t0 = time.time()
    weights = Path(cfg.weights or WEIGHTS)
    teacher = _measure_teacher(cfg, weights, log)
    tokenizer_path = text_tower_path() / "tokenizer.json"
    tokenizer_json = tokenizer_path.read_bytes()
    precision = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-dynamic", "int8-static": "int8-static-qdq"}[cfg.precision]
    if cfg.precision == "int8" and cfg.int8_activations == "per-token":
        precision = "int8-dynamic-per-token"
    common = dict(dim=teacher.dims[-1], matryoshka_dims=teacher.dims, precision=precision,
                  text_max_length=teacher.text_len, trace_trained=teacher.trace_trained, image=teacher.image_pre)
    with tempfile.TemporaryDirectory(prefix="moon3-build-") as tmp:
        tmp = Path(tmp)
        graphs = _export_graphs(cfg, weights, teacher.image_pre, tmp, log)
        candidates = _text_candidates(cfg, graphs, tokenizer_path, tmp, log)

        def package(out: Path, graph: Path, image: Path | None = None, **extra) -> Path:
            if cfg.layout == "split":  # with the chosen image graph, or the given one
                return package_split_embedder(out, (image or graphs.image).read_bytes(), graph.read_bytes(),
                                              graphs.head.read_bytes(), tokenizer_json, **common, **extra)
            return package_embedder(out, graph.read_bytes(), tokenizer_json, **common, **extra)

        graph, report, tried = _gate_text_candidates(cfg, candidates, package, teacher, tmp, log)
        if cfg.image_convs == "int8" and cfg.precision == "int8":
            if report["passed"]:  # the passing text graph with each image-graph candidate
                graphs.image, report = gate_image_convs(
                    graphs.folded_image, graphs.image, lambda image: package(tmp / "candidate.engine", graph, image=image),
                    report, teacher.views, teacher.products, teacher.image_pre, cfg, tmp, log)
            else:
                log("      image convolutions: not tried, no text-graph candidate passed the gates")
                report["image_convolutions"] = "fp32 (not tried: the text graph failed the gates)"
        extra, extra_parts, rdir, cdir = _optional_sections(cfg, weights, tmp, log)
        report["candidate"] = tried[-1]["candidate"]
        # not a gate: whether TensorRT's ONNX parser would read these graphs (sdk.export.trt_ops)
        report["tensorrt_parser"] = parser_report({"text": graph, **({"image": graphs.image} if cfg.layout == "split"
                                                                     else {})})
        report["candidates_tried"] = tried
        report["onnx_parity"] = {k: graphs.parity.get(k) for k in ("min_cosine", "mean_cosine", "max_abs_err", "rows")}
        report["eval_source"] = str(cfg.catalog or cfg.samples)
        if not report["passed"]:
            msg = f"engine failed its fidelity gates: {'; '.join(report['failed'])}"
            if cfg.enforce:
                raise GateError(msg + " (nothing written; --no-enforce writes it anyway)", report)
            log(f"WARNING: {msg}; written anyway (--no-enforce)")
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        out = package(cfg.out, graph, fidelity=report, extra_parts=extra_parts, extra={**extra, "build": {
            "precision": cfg.precision, "layout": cfg.layout, "weights": str(weights),
            "image_convs": report.get("image_convolutions", "fp32"),
            "image_matmuls": cfg.image_matmuls if cfg.precision == "int8" and cfg.layout == "split" else None,
            "int8_activations": cfg.int8_activations if cfg.precision == "int8" else None,
            "reasoner": str(rdir) if rdir else None, "reasoner_precision": cfg.reasoner_precision if rdir else None,
            "completion": str(cdir) if cdir else None,
            "seconds": round(time.time() - t0, 1)}})
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {precision}) in {time.time() - t0:.0f} s; "
        f"gates {'passed' if report['passed'] else 'FAILED'}")
    return out


def measure_latency(engine: Path, products: list[tuple[Path, str]], threads: int = 0, rounds: int = 15) -> dict:
    """Median batch-1 latency (ms) of an engine through `sdk.Embedder` per view of `AUTO_VIEWS`,
    cycling over `products` (3 warm-up calls first)."""
    from sdk.embedder import Embedder

    emb = Embedder(engine, threads=threads or None)
    try:
        out = {}
        for view in AUTO_VIEWS:
            times = []
            for k in range(rounds + 3):
                img, title = products[k % len(products)]
                t0 = time.perf_counter()
                emb.embed(images=[img] if view == "photo+title" else None, texts=[title], errors="raise")
                if k >= 3:
                    times.append(time.perf_counter() - t0)
            out[view] = round(float(np.median(times)) * 1e3, 3)
        return out
    finally:
        emb.close()


def pick_precision(results: list[dict]) -> tuple[dict, str]:
    """The fastest candidate that passed its gates (by the sum of its `AUTO_VIEWS` medians), and why.

    Raises:
        GateError: no candidate passed.
    """
    passed = [r for r in results if r["passed"]]
    if not passed:
        why = "; ".join(f"{r['precision']}: {'; '.join(r.get('failed') or ['failed'])}" for r in results)
        raise GateError(f"no precision passed the fidelity gates ({why})", {"auto": results, "passed": False})
    score = lambda r: sum(r["latency_ms"][v] for v in AUTO_VIEWS)  # noqa: E731
    best = min(passed, key=score)
    others = [f"{r['precision']} {score(r):.1f} ms" for r in passed if r is not best]
    failed = [r["precision"] for r in results if not r["passed"]]
    why = (f"{best['precision']}: the fastest that passed the gates ({score(best):.1f} ms for one photo+title "
           f"plus one title" + (f"; vs {', '.join(others)}" if others else "") + ")"
           + (f"; failed the gates: {', '.join(failed)}" if failed else ""))
    return best, why


def as_precision(cfg: BuildConfig, precision: str, **changes) -> BuildConfig:
    """`cfg` for one of `precision="auto"`'s candidates: the INT8-only options (image_convs,
    image_matmuls, int8_activations) kept for "int8" and set to their defaults for the others,
    which refuse them; `changes` as `dataclasses.replace`."""
    int8_only = {} if precision == "int8" else {"image_convs": "fp32", "image_matmuls": "int8",
                                                 "int8_activations": "per-tensor"}
    return dataclasses.replace(cfg, precision=precision, **int8_only, **changes)


def build_auto(cfg: BuildConfig, log=print) -> Path:
    """`precision="auto"`: build each of cfg.auto_candidates (embedder only), measure its fidelity
    (the gates) and its batch-1 latency on this machine, then build the fastest that passed, with
    the reasoner and completion parts, and record the comparison in its manifest (build.auto)."""
    from sdk.engine import EngineFile, write_engine

    products = eval_products(cfg.catalog, cfg.samples, cfg.eval_items)
    results = []
    with tempfile.TemporaryDirectory(prefix="moon3-auto-") as tmp:
        for n, precision in enumerate(cfg.auto_candidates, 1):
            log(f"[auto {n}/{len(cfg.auto_candidates)}] candidate {precision}")
            c = as_precision(cfg, precision, out=Path(tmp) / f"{precision}.engine", reasoner=None, completion=None,
                             enforce=True)
            try:
                path = build_engine(c, log=lambda msg, p=precision: log(f"  [{p}] {msg}"))
            except GateError as exc:
                results.append({"precision": precision, "passed": False, "failed": list(exc.report.get("failed", []))})
                log(f"  {precision}: failed its gates")
                continue
            with EngineFile.open(path) as f:
                fid = f.manifest["fidelity"]
            lat = measure_latency(path, products, cfg.threads, cfg.auto_rounds)
            results.append({"precision": precision, "passed": True, "latency_ms": lat,
                            "size_mib": round(path.stat().st_size / 2**20, 1),
                            "cosine_min": min(v["cosine_min"] for v in fid["views"].values()),
                            "text->image R@10 drop": fid["text->image R@10"]["drop"]})
            log(f"  {precision}: passed; batch-1 latency {lat}")
    best, why = pick_precision(results)
    log(f"[auto] chose {why}")
    out = build_engine(as_precision(cfg, best["precision"]), log)
    engine = EngineFile.read(out)
    manifest = json.loads(json.dumps(engine.manifest))
    manifest.setdefault("build", {})["auto"] = {"chosen": best["precision"], "why": why, "candidates": results}
    manifest["build"]["precision"] = "auto"
    manifest.pop("parts", None)
    write_engine(out, manifest, {name: engine.part(name) for name in engine.part_names})
    return out


def _completion_section(folder: Path, weights: Path, work: Path, explicit: bool, log=print):
    """Export the image completion weights in `folder` -> (manifest section, parts), or (None, {})
    when they were trained against other embedder weights and were not asked for explicitly."""
    from sdk.train.completion import load_completion
    from sdk.train.fusion_model import embedder_sha256s

    from .bundle import completion_parts
    from .onnx_completion import CompletionExportConfig, export_completion_onnx
    from .onnx_tools import ExportError

    model, meta = load_completion(folder)
    # the file's own hash, and for an fp16 copy the FP32 file it was converted from (trained against)
    names = embedder_sha256s(weights)
    sha = names[0]
    if meta.get("embedder_sha256") not in names:
        msg = (f"the completion weights in {folder} were trained against other embedder weights "
               f"(sha256 {str(meta.get('embedder_sha256'))[:12]}..., these are {sha[:12]}...); re-train them with "
               f"python -m sdk.train.completion")
        if explicit:
            raise ExportError(msg)
        log(f"WARNING: {msg}; the engine is built without image completion")
        return None, {}
    log(f"[+] completion: {folder} -> completion graph, parity vs PyTorch on padded batches")
    path = export_completion_onnx(model, CompletionExportConfig(work))
    parity = json.loads((work / "completion.parity.json").read_text())
    section, parts = completion_parts(path, embedder_sha256=sha, metrics=meta.get("metrics"),
                                      parity={k: parity.get(k) for k in ("min_cosine", "max_abs_err", "rows")})
    return section, parts


