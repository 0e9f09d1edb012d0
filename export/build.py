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
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from sdk.errors import SdkError

from .eval_reasoner import ReasonerGates
from .reasoner_quant import REASONER_PRECISIONS, ReasonerQuantConfig  # noqa: F401 - re-exported for the CLI

PRECISIONS = ("fp32", "fp16", "int8", "int8-static")
# `precision="auto"` builds these, keeps those that pass the fidelity gates, and picks the fastest
AUTO_CANDIDATES = ("int8", "int8-static", "fp16", "fp32")
AUTO_VIEWS = ("photo+title", "title")  # the batch-1 calls timed per candidate; their medians are summed
LAYOUTS = ("split", "single")
IMAGE_CONVS = ("fp32", "int8")  # the image tower's convolutions in an "int8" split engine
# "int8" engines' activation scales: one per tensor (per batch) or one per token (sdk.export.per_token)
INT8_ACTIVATIONS = ("per-tensor", "per-token")
# Image-convolution candidates: the k convolutions most sensitive to static INT8 (each measured
# alone) stay FP32; the first k whose engine passes the gates wins, else every convolution stays FP32.
IMAGE_CONV_LADDER = (0, 2, 4, 8, 16)
IMAGE_SWEEP_MIN_COSINE = 0.98  # image-token cosine a candidate needs before it is gated end to end
SPLIT_ONLY = ("int8-static", "fp16")  # precisions that build the split layout's graphs only
REPO_SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
# the catalog's train-split calibration titles, shipped
# (python -m sdk.train.samples --catalog ../shared/data/catalog --calib-out data/calib --calib-only)
REPO_CALIB = Path(__file__).resolve().parent.parent / "data" / "calib"


class GateError(SdkError):
    """A built engine failed a fidelity gate; `.report` holds the measurements."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class FidelityGates:
    """Minimum fidelity of an engine against the FP32 teacher (per-item cosine, retrieval)."""

    min_cosine_mean: float = 0.995
    min_cosine_min: float = 0.97
    max_recall_drop: float = 0.01  # absolute R@10 drop allowed (0.01 = 1 point)

    def __post_init__(self) -> None:
        for name in ("min_cosine_mean", "min_cosine_min"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [-1, 1], got {v}")
        if not 0.0 <= self.max_recall_drop <= 1.0:
            raise ValueError(f"max_recall_drop must be in [0, 1], got {self.max_recall_drop}")


@dataclass
class BuildConfig:
    """What to build and how to check it.

    Attributes:
        out: the engine file to write.
        precision: "fp32", "fp16", "int8" (dynamic per-channel INT8 MatMul/Gemm weights),
            "int8-static" or "auto".
        weights: folder with the trained fusion weights (default: the committed ones).
        samples: catalog folder (items.jsonl + images) of the evaluation products, used when
            `catalog` is None (default: the repo's data/samples).
        catalog: a full catalog; its validation split (ids ending in 0) is used for the gates.
        eval_items: at most this many evaluation products (photo + title).
        gates: fidelity gates; enforce=False writes the engine even when a gate fails.
        threads: onnxruntime threads while measuring (0 = default).
        calib_method, calib_items: calibrator ("minmax", "entropy", "percentile") and number of
            titles (stratified by article type; the catalog's train split) for "int8-static" and
            for SmoothQuant.
        smooth_alpha: "int8" applies SmoothQuant with this migration strength
            (`sdk.calib.smooth_matmul_inputs`, calibrated on `calib_items` titles) before
            quantizing, for every candidate that keeps text matmuls INT8 (all of them, then the
            FFN down-projections FP32, then the FFN FP32); None quantizes the plain graph.
        reasoner: folder of trained reasoner weights to add (exported to ONNX, greedy parity
            checked); "auto" adds the committed ones when present; None leaves it out.
        layout: "split" (image graph + text graph + NumPy/fused-op head: each tower runs only
            for the items that have its modality) or "single" (one ONNX graph).
        completion: folder of trained image completion weights (`sdk.train.completion`) to add
            as the engine's optional "completion" part (split layout only); "auto" adds the
            committed ones when present and trained against the embedder weights used; None
            leaves it out.
        reasoner_precision: "fp32", "int8" (dynamic) or "int4" (weight-only MatMulNBits) for the
            reasoner's graphs; a quantized reasoner is measured against the FP32 one through the
            runtime on `reasoner_eval_items` evaluation products and gated by `reasoner_gates`.
        reasoner_block_size, reasoner_lm_head, reasoner_accuracy_level: INT4 block length; quantize
            the tied LM head too; MatMulNBits compute type (see `ReasonerQuantConfig`).
        image_convs: "fp32" keeps the image tower's convolutions in FP32; "int8" (precision
            "int8", split layout) quantizes them statically (per-channel INT8 weights, unsigned
            INT8 activations calibrated on `calib_images` photos), after a sensitivity sweep
            keeps the most sensitive ones FP32 as `IMAGE_CONV_LADDER` says, each candidate gated
            end to end; when none passes, the convolutions stay FP32.
        calib_images: photos (stratified; the catalog's train split) for the image calibration.
        int8_activations: "per-tensor" (ONNX Runtime's dynamic quantization: one activation scale
            per batch, so an item's vector moves slightly with its batch neighbours) or "per-token"
            (one scale per token, `sdk.export.per_token`: an item's vector is the same alone or in
            any batch); precision "int8" only.
        calib_titles: folder (items.jsonl) of the text calibration titles when no `catalog` is
            given. None: the repo's data/calib (the titles the catalog would give) while
            `samples` is the repo's data/samples, else `samples` itself (your own products).
    """

    out: str | Path = "moon3.engine"
    precision: str = "int8"
    weights: str | Path | None = None
    samples: str | Path = REPO_SAMPLES
    catalog: str | Path | None = None
    calib_titles: str | Path | None = None
    eval_items: int = 400
    gates: FidelityGates = field(default_factory=FidelityGates)
    enforce: bool = True
    threads: int = 0
    layout: str = "split"
    reasoner: str | Path | None = "auto"
    calib_method: str = "percentile"
    calib_items: int = 256
    smooth_alpha: float | None = 0.7
    completion: str | Path | None = "auto"
    reasoner_precision: str = "int4"
    reasoner_block_size: int = 32
    reasoner_lm_head: bool = False
    reasoner_accuracy_level: int | None = 4
    reasoner_gates: ReasonerGates = field(default_factory=ReasonerGates)
    reasoner_eval_items: int = 150
    auto_candidates: tuple[str, ...] = AUTO_CANDIDATES
    auto_rounds: int = 15
    image_convs: str = "fp32"
    calib_images: int = 64
    int8_activations: str = "per-tensor"

    def completion_dir(self) -> Path | None:
        if self.completion is None or self.layout != "split":
            return None
        if self.completion == "auto":
            d = Path(__file__).resolve().parent.parent / "train" / "weights" / "completion"
            return d if (d / "completion.safetensors").is_file() else None
        return Path(self.completion)

    def reasoner_dir(self) -> Path | None:
        if self.reasoner is None:
            return None
        if self.reasoner == "auto":
            d = Path(__file__).resolve().parent.parent / "train" / "weights" / "reasoner"
            return d if (d / "reasoner.safetensors").is_file() else None
        return Path(self.reasoner)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.precision in SPLIT_ONLY and self.layout != "split":
            raise ValueError(f"precision {self.precision!r} needs layout 'split'")
        from sdk.calib import METHODS

        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1] or None, got {self.smooth_alpha}")
        if self.calib_method not in METHODS:
            raise ValueError(f"calib_method must be one of {METHODS}, got {self.calib_method!r}")
        if self.precision not in (*PRECISIONS, "auto"):
            raise ValueError(f"precision must be one of {(*PRECISIONS, 'auto')}, got {self.precision!r}")
        bad = [p for p in self.auto_candidates if p not in PRECISIONS]
        if not self.auto_candidates or bad:
            raise ValueError(f"auto_candidates must be precisions of {PRECISIONS}, got {self.auto_candidates}")
        split_only = [p for p in self.auto_candidates if p in SPLIT_ONLY]
        if self.precision == "auto" and self.layout != "split" and split_only:
            raise ValueError(f"auto_candidates {split_only} need layout 'split'")
        if self.eval_items < 20:
            raise ValueError(f"eval_items must be >= 20 for a meaningful recall, got {self.eval_items}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.image_convs not in IMAGE_CONVS:
            raise ValueError(f"image_convs must be one of {IMAGE_CONVS}, got {self.image_convs!r}")
        if self.image_convs == "int8" and (self.precision not in ("int8", "auto") or self.layout != "split"):
            raise ValueError(f"image_convs 'int8' needs precision 'int8' (or 'auto') and layout 'split', got "
                             f"precision {self.precision!r}, layout {self.layout!r}")
        if self.int8_activations not in INT8_ACTIVATIONS:
            raise ValueError(f"int8_activations must be one of {INT8_ACTIVATIONS}, got {self.int8_activations!r}")
        if self.int8_activations != "per-tensor" and self.precision not in ("int8", "auto"):
            raise ValueError(f"int8_activations {self.int8_activations!r} needs precision 'int8' (or 'auto'), "
                             f"got {self.precision!r}")
        if self.calib_images < 8:
            raise ValueError(f"calib_images must be >= 8 (one calibration batch), got {self.calib_images}")
        self.reasoner_quant()  # validates precision and block size
        if self.reasoner_eval_items < 1:
            raise ValueError(f"reasoner_eval_items must be >= 1, got {self.reasoner_eval_items}")

    def reasoner_quant(self) -> ReasonerQuantConfig:
        return ReasonerQuantConfig(self.reasoner_precision, self.reasoner_block_size, self.reasoner_lm_head,
                                   self.reasoner_accuracy_level)


def eval_products(catalog, samples, limit: int) -> list[tuple[Path, str]]:
    """(photo path, title) of at most `limit` evaluation products: the validation split of
    `catalog` when given, else every product with a photo in the `samples` folder."""
    if catalog is not None:
        from sdk.train.catalog import catalog_split, read_catalog

        split = catalog_split(catalog)
        items = [(p.image, p.title) for p in read_catalog(catalog) if split.is_validation(p.id) and p.image]
    else:
        root = Path(samples)
        path = root / "items.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation products: {path} does not exist (pass --catalog)")
        recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        items = [(root / r["image"], r["title"]) for r in recs if r.get("image")]
    return items[:limit]


def recall_at_10(text: np.ndarray, photos: np.ndarray, titles: list[str]) -> float:
    """Text->image R@10 where a hit is a photo whose product has the query's title."""
    keys = np.array([t.strip().lower() for t in titles])
    top = np.argsort(-(text @ photos.T), axis=1)[:, :10]
    return float((keys[top] == keys[:, None]).any(1).mean())


def probe_trace(title: str) -> str:
    """A reasoning trace in the reasoner's format for a product, to check the trace path's numerics."""
    return f"<think> the product is {title.lower()}; the title names it </think> {title}"


def embed_views(embed, products: list[tuple[Path, str]]) -> dict[str, np.ndarray]:
    """The four views of each product with an `embed(images=, texts=, traces=)` callable."""
    imgs = [p for p, _ in products]
    titles = [t for _, t in products]
    return {
        "photo+title": embed(images=imgs, texts=titles),
        "photo": embed(images=imgs, texts=None),
        "title": embed(images=None, texts=titles),
        "photo+title+trace": embed(images=imgs, texts=titles, traces=[probe_trace(t) for t in titles]),
    }


def fidelity_report(teacher: dict, engine: dict, titles: list[str], gates: FidelityGates) -> dict:
    """Compare engine vectors with the teacher's, view by view, and apply the gates."""
    report: dict = {"items": len(titles), "views": {}}
    worst_mean, worst_min = 1.0, 1.0
    for view, t in teacher.items():
        cos = np.sum(t * engine[view], axis=1)  # both L2-normalised
        report["views"][view] = {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6)}
        worst_mean, worst_min = min(worst_mean, float(cos.mean())), min(worst_min, float(cos.min()))
    r_t = recall_at_10(teacher["title"], teacher["photo"], titles)
    r_e = recall_at_10(engine["title"], engine["photo"], titles)
    report["text->image R@10"] = {"teacher": round(r_t, 4), "engine": round(r_e, 4), "drop": round(r_t - r_e, 4)}
    failed = []
    if worst_mean < gates.min_cosine_mean:
        failed.append(f"cosine mean {worst_mean:.4f} < {gates.min_cosine_mean}")
    if worst_min < gates.min_cosine_min:
        failed.append(f"cosine min {worst_min:.4f} < {gates.min_cosine_min}")
    if r_t - r_e > gates.max_recall_drop + 1e-9:  # a drop of exactly the allowance passes (0.905 - 0.895 > 0.01 in floats)
        failed.append(f"R@10 drop {r_t - r_e:.4f} > {gates.max_recall_drop}")
    report["gates"] = asdict(gates)
    report["passed"] = not failed
    report["failed"] = failed
    return report


# INT8 candidates, most aggressive first: (label, regex of module paths whose MatMul/Gemm stay
# FP32). The first candidate that passes the gates is shipped: an accuracy-driven fallback by
# layer group. (Attention-score matmuls have no constant input; the dynamic quantizer leaves
# them in FP32 anyway.)
INT8_CANDIDATES: tuple[tuple[str, str | None], ...] = (
    ("all MatMul/Gemm int8", None),
    ("text FFN down-projections fp32", r"^text_encoder\.encoder\.layer\.\d+\.output\.dense$"),
    ("text FFN fp32", r"^text_encoder\.encoder\.layer\.\d+\.(intermediate|output)\.dense$"),
    ("text tower fp32", r"^text_encoder\."),
)


def int8_candidates(scopes: dict[str, str], smooth_alpha: float | None) -> list[tuple[str, list[str], bool]]:
    """The "int8" build's candidates in order: (label, names of the text-graph matmuls kept FP32,
    whether it quantizes the SmoothQuant-ed graph). With `smooth_alpha`, every candidate that
    keeps text matmuls INT8 quantizes the smoothed graph (FP32-equivalent, kinder to per-tensor
    INT8); the last one, the text tower in FP32, needs no smoothing."""
    out = []
    for k, (label, pattern) in enumerate(INT8_CANDIDATES):
        exclude = sorted(n for n, sc in scopes.items() if pattern and re.search(pattern, sc))
        smooth = smooth_alpha is not None and k < len(INT8_CANDIDATES) - 1
        out.append((label + (f" after SmoothQuant (alpha {smooth_alpha})" if smooth else ""), exclude, smooth))
    return out


def matmul_scopes(path: Path) -> dict[str, str]:
    """Node name -> PyTorch module path of each MatMul/Gemm (from the exporter's node metadata)."""
    import ast

    import onnx

    scopes = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            meta = {p.key: p.value for p in node.metadata_props}
            try:
                # [..., "text_encoder.encoder.layer.0.output.dense", "linear_5"]: module, then op
                scopes[node.name] = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))[-2]
            except (ValueError, SyntaxError, IndexError):
                scopes[node.name] = ""
    return scopes


def measure_engine(engine: Path, teacher_views: dict, products, gates: FidelityGates, threads: int = 0, log=print) -> dict:
    """Run an engine through the runtime on `products` and compare with the teacher's vectors."""
    from sdk.embedder import Embedder

    runtime = Embedder(engine, threads=threads or None)
    engine_views = embed_views(lambda **kw: runtime.embed(**kw, errors="raise"), products)
    report = fidelity_report(teacher_views, engine_views, [t for _, t in products], gates)
    for view, v in report["views"].items():
        log(f"      {view:12s} cosine mean {v['cosine_mean']:.5f}  min {v['cosine_min']:.5f}")
    r = report["text->image R@10"]
    log(f"      text->image R@10 teacher {r['teacher']:.4f}  engine {r['engine']:.4f}  drop {r['drop']:+.4f}"
        f"  -> {'passed' if report['passed'] else 'failed: ' + '; '.join(report['failed'])}")
    return report


def validate_engine(
    engine: str | Path,
    *,
    catalog: str | Path | None = None,
    samples: str | Path = REPO_SAMPLES,
    eval_items: int = 400,
    gates: FidelityGates | None = None,
    weights: str | Path | None = None,
    threads: int = 0,
    log=print,
) -> dict:
    """Measure an existing engine against the FP32 teacher (the committed weights by default).

    Returns:
        The fidelity report; report["passed"] says whether every gate passed.

    Raises:
        EngineError: the engine file is missing or damaged.
        FileNotFoundError: no evaluation products.
    """
    from sdk.engine import EngineFile
    from sdk.train.reference import WEIGHTS_DIR, ReferenceEmbedder

    EngineFile.read(engine)  # refuse a damaged file before loading the teacher
    products = eval_products(catalog, samples, eval_items)
    if len(products) < 20:
        raise ValueError(f"only {len(products)} evaluation products with a photo; need >= 20")
    log(f"teacher: FP32 reference embedder on {len(products)} products ({catalog or samples})")
    teacher = ReferenceEmbedder(Path(weights or WEIGHTS_DIR))
    teacher_views = embed_views(teacher.embed, products)
    del teacher
    log(f"engine: {engine}")
    report = measure_engine(Path(engine), teacher_views, products, gates or FidelityGates(), threads, log)
    report["eval_source"] = str(catalog or samples)
    return report


def fold_constants(src: Path, dst: Path) -> Path:
    """onnxruntime's pre-quantization pass (constant folding, shape inference).

    The exporter feeds shared text-tower weights (title and trace use one encoder) through
    Transpose nodes; only MatMuls whose weight is an initializer get quantized, so fold first.
    Node names survive, so module paths from `matmul_scopes` still apply.
    """
    from onnxruntime.quantization import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


# Kept in FP32 in an FP16 graph, besides onnxruntime's default list (ops without FP16 kernels):
# normalisation and softmax, whose sums and exponentials lose most in FP16.
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Softmax")


def convert_fp16(src: Path, dst: Path) -> Path:
    """FP16 weights and activations, float32 inputs and outputs (Cast nodes at the edges), with the
    ops of `FP16_KEEP_FP32` computing in FP32 (onnxruntime's transformer float16 converter).

    The split engine's head (projection, Matryoshka truncation, final L2 norm) stays FP32 anyway:
    it runs outside the graphs.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                     op_block_list=sorted({*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32}))
    onnx.save(model, str(dst))
    return dst


def quantize_int8(src: Path, dst: Path, exclude: list[str] | None = None, activations: str = "per-tensor") -> Path:
    """Dynamic per-channel INT8 of MatMul/Gemm (weights offline, activations at run time).

    Args:
        src: a constant-folded ONNX graph (`fold_constants`); dst: output path;
        exclude: node names kept in FP32; activations: "per-tensor" (one activation scale per
            tensor, as ONNX Runtime writes it) or "per-token" (`sdk.export.per_token`).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if activations not in INT8_ACTIVATIONS:
        raise ValueError(f"activations must be one of {INT8_ACTIVATIONS}, got {activations!r}")
    plain = dst.with_name(dst.stem + ".per-tensor.onnx") if activations == "per-token" else dst
    quantize_dynamic(
        str(src), str(plain), per_channel=True, weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=list(exclude or []),
    )
    if activations == "per-token":
        from .per_token import per_token_activations

        per_token_activations(plain, dst)
    return dst


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
    from sdk.train.reference import WEIGHTS_DIR, ReferenceEmbedder
    from sdk.train.towers import text_tower_path

    from .bundle import package_embedder, package_split_embedder
    from .onnx_embedder import OnnxExportConfig, build_reference_graph, export_embedder_onnx
    from .onnx_split import SplitExportConfig, export_split_onnx

    t0 = time.time()
    weights = Path(cfg.weights or WEIGHTS_DIR)
    products = eval_products(cfg.catalog, cfg.samples, cfg.eval_items)
    log(f"[1/4] teacher: FP32 reference embedder on {len(products)} evaluation products")
    teacher = ReferenceEmbedder(weights)
    teacher_views = embed_views(teacher.embed, products)
    dims = list(teacher.model.cfg.matryoshka_dims)
    text_len = teacher.tokenizer.max_length
    image_pre = teacher.preprocess  # the photo size the fusion model was trained for (224, or a student's)
    trace_trained = bool(teacher.metrics.get("trace_trained", False))
    del teacher
    tokenizer_path = text_tower_path() / "tokenizer.json"
    tokenizer_json = tokenizer_path.read_bytes()
    precision = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-dynamic", "int8-static": "int8-static-qdq"}[cfg.precision]
    if cfg.precision == "int8" and cfg.int8_activations == "per-token":
        precision = "int8-dynamic-per-token"
    common = dict(dim=dims[-1], matryoshka_dims=dims, precision=precision, text_max_length=text_len,
                  trace_trained=trace_trained, image=image_pre)
    with tempfile.TemporaryDirectory(prefix="moon3-build-") as tmp:
        tmp = Path(tmp)
        graph = build_reference_graph(weights)
        if cfg.layout == "split":
            log("[2/4] export: image graph + text graph + head, parity vs PyTorch on padded batches")
            # The static Q/DQ graph is TensorRT's format: the exporter's plain ops, no com.microsoft ones.
            paths = export_split_onnx(graph, SplitExportConfig(tmp / "split", image_size=image_pre.size,
                                                               fused_text=cfg.precision != "int8-static"))
            parity = json.loads((tmp / "split" / "split.parity.json").read_text())
            text_graph, image_graph = paths["text"], paths["image"]
        else:
            log("[2/4] export: one ONNX graph (towers + fusion), parity vs PyTorch on padded batches")
            text_graph = export_embedder_onnx(graph, OnnxExportConfig(tmp / "embedder.onnx", image_size=image_pre.size))
            parity = json.loads(text_graph.with_suffix(".parity.json").read_text())
        del graph
        if cfg.precision.startswith("int8"):
            # The candidates name text-tower modules; in a split engine the image graph (its
            # image-encoder matmuls) is quantized once, whole, dynamically.
            scopes = matmul_scopes(text_graph)
            folded = fold_constants(text_graph, tmp / "text.folded.onnx")
            if cfg.layout == "split":
                folded_image = fold_constants(image_graph, tmp / "image.folded.onnx")
                image_graph = quantize_int8(folded_image, tmp / "image.int8.onnx", activations=cfg.int8_activations)
        sources: dict[str, Path] = {}  # candidate label -> the graph it quantizes, when not `folded`
        if cfg.precision == "int8":
            listed = int8_candidates(scopes, cfg.smooth_alpha)
            candidates = [(label, exclude) for label, exclude, _ in listed]
            if cfg.smooth_alpha is not None:
                from sdk.calib import smooth_matmul_inputs

                smoothed = tmp / "text.smoothed.onnx"
                smoothing = smooth_matmul_inputs(folded, smoothed, _calibration(cfg, tokenizer_path),
                                                 alpha=cfg.smooth_alpha)
                log(f"[3/4] SmoothQuant: {smoothing['matmuls']} text-graph matmuls rescaled "
                    f"({smoothing['groups']} inputs, calibrated on {smoothing['calibration']})")
                sources = {label: smoothed for label, _, smooth in listed if smooth}
        elif cfg.precision == "int8-static":
            candidates = _static_candidates(folded, scopes, tokenizer_path, cfg, tmp, log)
        else:
            candidates = [(cfg.precision, [])]
        if cfg.precision == "fp16":  # split layout only (checked by BuildConfig)
            image_graph = convert_fp16(fold_constants(image_graph, tmp / "image.folded.onnx"), tmp / "image.fp16.onnx")

        def package(out: Path, graph: Path, image: Path | None = None, **extra) -> Path:
            if cfg.layout == "split":  # with `image_graph`, or the given image graph
                return package_split_embedder(out, (image or image_graph).read_bytes(), graph.read_bytes(),
                                              paths["head"].read_bytes(), tokenizer_json, **common, **extra)
            return package_embedder(out, graph.read_bytes(), tokenizer_json, **common, **extra)

        tried = []
        for n, (label, exclude) in enumerate(candidates, 1):
            if cfg.precision.startswith("int8"):
                kind = "static Q/DQ" if cfg.precision == "int8-static" else "dynamic"
                log(f"[3/4] quantize: INT8 {kind} per channel, candidate {n}/{len(candidates)}: {label} "
                    f"({len(exclude)} of {len(scopes)} text-graph matmuls fp32)")
                if cfg.precision == "int8":
                    graph = quantize_int8(sources.get(label, folded), tmp / f"text.int8.{n}.onnx", exclude,
                                          activations=cfg.int8_activations)
                else:
                    graph = _quantize_static(folded, tmp / f"text.qdq.{n}.onnx", exclude, tmp, cfg)
            elif cfg.precision == "fp16":
                log(f"[3/4] convert: FP16 weights and activations ({', '.join(FP16_KEEP_FP32)} in FP32; "
                    "float32 inputs and outputs)")
                graph = convert_fp16(fold_constants(text_graph, tmp / "text.folded.onnx"), tmp / "text.fp16.onnx")
            else:
                log("[3/4] quantize: skipped (fp32)")
                graph = text_graph
            candidate = package(tmp / "candidate.engine", graph)
            log("[4/4] fidelity: the candidate engine through sdk.Embedder vs the FP32 teacher")
            report = measure_engine(candidate, teacher_views, products, cfg.gates, cfg.threads, log)
            tried.append({"candidate": label, "passed": report["passed"], "failed": report["failed"],
                          "views": report["views"], "text->image R@10": report["text->image R@10"]})
            if report["passed"]:
                break
        if cfg.image_convs == "int8" and cfg.precision == "int8":
            if report["passed"]:  # the passing text graph with each image-graph candidate
                image_graph, report = _gate_image_convs(
                    folded_image, image_graph, lambda image: package(tmp / "candidate.engine", graph, image=image),
                    report, teacher_views, products, image_pre, cfg, tmp, log)
            else:
                log("      image convolutions: not tried, no text-graph candidate passed the gates")
                report["image_convolutions"] = "fp32 (not tried: the text graph failed the gates)"
        extra, extra_parts = {}, {}
        rdir = cfg.reasoner_dir()
        if rdir is not None:
            extra, extra_parts = _reasoner_section(rdir, tmp / "reasoner", cfg, log)
        cdir = cfg.completion_dir()
        if cdir is not None:
            section, parts = _completion_section(cdir, weights, tmp / "completion", explicit=cfg.completion != "auto",
                                                 log=log)
            if section is not None:
                extra, extra_parts = {**extra, "completion": section}, {**extra_parts, **parts}
            else:
                cdir = None
        report["candidate"] = tried[-1]["candidate"]
        # not a gate: whether TensorRT's ONNX parser would read these graphs (sdk.export.trt_ops)
        from .trt_ops import parser_report

        graphs = {"text": graph, **({"image": image_graph} if cfg.layout == "split" else {})}
        report["tensorrt_parser"] = parser_report(graphs)
        report["candidates_tried"] = tried
        report["onnx_parity"] = {k: parity.get(k) for k in ("min_cosine", "mean_cosine", "max_abs_err", "rows")}
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
            c = dataclasses.replace(cfg, precision=precision, out=Path(tmp) / f"{precision}.engine", reasoner=None,
                                    image_convs=cfg.image_convs if precision == "int8" else "fp32",
                                    completion=None, enforce=True)
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
    out = build_engine(dataclasses.replace(cfg, precision=best["precision"],
                                           image_convs=cfg.image_convs if best["precision"] == "int8" else "fp32"), log)
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
    from sdk.train.embedder import embedder_sha256s

    from .bundle import completion_parts
    from .onnx_completion import CompletionExportConfig, export_completion_onnx
    from .onnx_embedder import ExportError

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


def _reasoner_section(folder: Path, work: Path, cfg: BuildConfig, log=print) -> tuple[dict, dict[str, bytes]]:
    """Export the trained reasoner in `folder`, quantize and gate it as cfg says; ({"reasoner": section}, parts).

    Raises:
        GateError: the quantized reasoner failed its gates against the FP32 one and cfg.enforce.
    """
    from sdk.train.reasoner import TASKS, load_reasoner
    from sdk.train.towers import load_image_tower

    from .bundle import package_reasoner, reasoner_parts
    from .eval_reasoner import eval_records
    from .onnx_reasoner import ReasonerExportConfig, export_reasoner_onnx
    from .reasoner_quant import quantize_reasoner

    log(f"[+] reasoner: {folder} -> visual + step graphs, greedy parity vs PyTorch")
    model, tok = load_reasoner(folder)
    export_reasoner_onnx(load_image_tower(), model, ReasonerExportConfig(work / "fp32"))
    parity = json.loads((work / "fp32" / "reasoner.parity.json").read_text())
    report = folder / "reasoner_report.json"
    metrics = json.loads(report.read_text()) if report.is_file() else {}
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    common = dict(tasks=TASKS, max_len=model.cfg.max_len, parity=parity, metrics=metrics)
    tok_json = tok.to_str().encode()
    del model
    qcfg = cfg.reasoner_quant()
    if qcfg.precision == "fp32":
        section, parts = reasoner_parts(work / "fp32", tok_json, **common)
        return {"reasoner": section}, parts
    log(f"[+] reasoner: quantize {qcfg.label()} with onnxruntime's quantizer")
    quant = quantize_reasoner(work / "fp32", work / qcfg.precision, qcfg)
    for name, info in quant["parts"].items():
        log(f"      {name}: {info['quantized_ops']} quantized, {info['fp32_weight_matmuls']} FP32 weight matmuls, "
            f"{info['bytes'] / 2**20:.1f} MiB")
    records = eval_records(cfg.catalog, None if cfg.catalog else cfg.samples, cfg.reasoner_eval_items)
    log(f"[+] reasoner fidelity: {qcfg.precision} vs FP32 through sdk.Reasoner on {len(records)} products "
        f"({cfg.catalog or cfg.samples})")
    engines = {}
    for name, graphs, q in (("fp32", work / "fp32", None), (qcfg.precision, work / qcfg.precision, quant)):
        sec, prt = reasoner_parts(graphs, tok_json, **common, precision=name, quantization=q)
        engines[name] = package_reasoner(work / f"{name}.engine", sec, prt)
    verdict = gate_reasoner(engines["fp32"], engines[qcfg.precision], records, cfg.reasoner_gates, label=qcfg.label(),
                            enforce=cfg.enforce, threads=cfg.threads, log=log)
    verdict["eval_source"] = str(cfg.catalog or cfg.samples)
    quant["fidelity"] = verdict
    section, parts = reasoner_parts(work / qcfg.precision, tok_json, **common, precision=qcfg.precision,
                                    quantization=quant)
    return {"reasoner": section}, parts


def build_reasoner_engines(folder: str | Path, out_dir: str | Path, precisions=REASONER_PRECISIONS,
                           quant: ReasonerQuantConfig | None = None, log=print) -> dict[str, Path]:
    """Engines holding only the reasoner in `folder`, one per precision (exported once, greedy parity
    checked, then quantized; no gate): `out_dir/reasoner-{precision}.engine`. For benchmarks and
    `python -m sdk.export.eval_reasoner`; `build_engine` is what gates and ships."""
    from sdk.train.reasoner import TASKS, load_reasoner
    from sdk.train.towers import load_image_tower

    from .bundle import package_reasoner, reasoner_parts
    from .onnx_reasoner import ReasonerExportConfig, export_reasoner_onnx
    from .reasoner_quant import quantize_reasoner

    out_dir = Path(out_dir)
    model, tok = load_reasoner(folder)
    out = {}
    with tempfile.TemporaryDirectory(prefix="moon3-reasoner-") as tmp:
        work = Path(tmp)
        log(f"reasoner: {folder} -> visual + step graphs, greedy parity vs PyTorch")
        export_reasoner_onnx(load_image_tower(), model, ReasonerExportConfig(work / "fp32"))
        parity = json.loads((work / "fp32" / "reasoner.parity.json").read_text())
        for precision in precisions:
            qcfg = dataclasses.replace(quant or ReasonerQuantConfig(), precision=precision)
            record = quantize_reasoner(work / "fp32", work / precision, qcfg)
            section, parts = reasoner_parts(work / precision, tok.to_str().encode(), tasks=TASKS,
                                            max_len=model.cfg.max_len, parity=parity, precision=precision,
                                            quantization=record if precision != "fp32" else None)
            out_dir.mkdir(parents=True, exist_ok=True)
            out[precision] = package_reasoner(out_dir / f"reasoner-{precision}.engine", section, parts)
            log(f"wrote {out[precision]} ({out[precision].stat().st_size / 2**20:.2f} MiB, {qcfg.label()})")
    return out


def gate_reasoner(reference: Path, candidate: Path, records: list[dict], gates: ReasonerGates, *, label: str,
                  enforce: bool = True, threads: int = 0, log=print) -> dict:
    """Measure a quantized reasoner engine against the FP32 one through `sdk.Reasoner` and apply the gates.

    Returns:
        The verdict (`sdk.export.eval_reasoner.gate`): both engines' metrics, drops, token agreement.

    Raises:
        GateError: a gate failed and `enforce` (the message names the failed gates and the drops).
    """
    from .eval_reasoner import agreement, evaluate_engine, format_metrics, gate

    measured = {}
    for name, engine in (("fp32", reference), (label, candidate)):
        measured[name] = evaluate_engine(engine, records, threads=threads or None, trace_items=min(100, len(records)))
        log(f"      {name}: {format_metrics(measured[name][0])}")
    (ref, ref_out), (cand, cand_out) = measured["fp32"], measured[label]
    verdict = gate(ref, cand, agreement(cand_out, ref_out), gates, n_items=len(records))
    ag = verdict["agreement"]
    log(f"      agreement: {ag['exact']:.4f} of generations identical, {ag['tokens']:.4f} of tokens -> "
        f"{'passed' if verdict['passed'] else 'failed: ' + '; '.join(verdict['failed'])}")
    if not verdict["passed"]:
        d = verdict["drop"]
        msg = (f"the {label} reasoner failed its gates against the FP32 reasoner on {len(records)} products: "
               f"{'; '.join(verdict['failed'])} (attribute F1 photo {ref['attribute_f1_photo']:.4f} -> "
               f"{cand['attribute_f1_photo']:.4f}, title {ref['attribute_f1_title']:.4f} -> "
               f"{cand['attribute_f1_title']:.4f}; "
               f"category accuracy drops {d['category_acc_photo']:+.4f} / {d['category_acc_title']:+.4f})")
        if enforce:
            raise GateError(msg + " (nothing written; --no-enforce writes it anyway, "
                            "--reasoner-precision fp32 ships the FP32 reasoner)", verdict)
        log(f"WARNING: {msg}; written anyway (--no-enforce)")
    return verdict


def text_layer_groups(scopes: dict[str, str]) -> dict[str, list[str]]:
    """Text-graph matmuls grouped by transformer sublayer ("layer 3 attention", "layer 3 ffn in", ...)."""
    groups: dict[str, list[str]] = {}
    for node, scope in sorted(scopes.items()):
        m = re.search(r"encoder\.layer\.(\d+)\.(attention|intermediate|output)", scope)
        name = f"layer {m.group(1)} {dict(attention='attention', intermediate='ffn in', output='ffn out')[m.group(2)]}" \
            if m else "other"
        groups.setdefault(name, []).append(node)
    return groups


def _calibration(cfg: BuildConfig, tokenizer_path: Path):
    from sdk.calib import CalibrationSet

    return CalibrationSet.text_from_catalog(Path(calibration_root(cfg)), tokenizer_path, n=cfg.calib_items)


def calibration_root(cfg: BuildConfig) -> Path:
    """Where the build's text calibration titles come from (see `BuildConfig.calib_titles`)."""
    if cfg.catalog:
        return Path(cfg.catalog)
    if cfg.calib_titles is not None:
        return Path(cfg.calib_titles)
    repo = Path(cfg.samples).resolve() == REPO_SAMPLES.resolve()
    return REPO_CALIB if repo and (REPO_CALIB / "items.jsonl").is_file() else Path(cfg.samples)


def _static_candidates(folded: Path, scopes: dict[str, str], tokenizer_path: Path, cfg: BuildConfig, tmp: Path, log):
    """Static INT8 candidates: the sublayers most sensitive to quantization return to FP32 first."""
    from sdk.calib import sensitivity_sweep

    cal = _calibration(cfg, tokenizer_path)
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


def _quantize_static(folded: Path, dst: Path, exclude: list[str], tmp: Path, cfg: BuildConfig) -> Path:
    from sdk.calib import quantize_static_qdq

    return quantize_static_qdq(folded, dst, None, method=cfg.calib_method, exclude=exclude, cache=tmp / "text.calib.json")


def _image_conv_candidates(folded: Path, cfg: BuildConfig, image_pre, tmp: Path,
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


def _gate_image_convs(folded: Path, fallback: Path, package, report: dict, teacher_views: dict, products,
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
    candidates, ranking = _image_conv_candidates(folded, cfg, image_pre, tmp, log)
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

