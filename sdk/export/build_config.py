"""`moon3 build`'s settings (`BuildConfig`, one field per `moon3 build` flag) and the precisions,
layouts and candidates it knows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdk.train.eval_reasoner import ReasonerGates

from ..paths import ATTRIBUTE_HEADS_WEIGHTS, COMPLETION_WEIGHTS, REASONER_WEIGHTS, SAMPLES
from .gates import FidelityGates
from .quantize import INT8_ACTIVATIONS
from .reasoner_quant import ReasonerQuantConfig

PRECISIONS = ("fp32", "fp16", "int8", "int8-static")
# `precision="auto"` builds these, keeps those that pass the fidelity gates, and picks the fastest
AUTO_CANDIDATES = ("int8", "int8-static", "fp16", "fp32")
AUTO_VIEWS = ("photo+title", "title")  # the batch-1 calls timed per candidate; their medians are summed
LAYOUTS = ("split", "single")
IMAGE_CONVS = ("fp32", "int8")  # the image tower's convolutions in an "int8" split engine
IMAGE_MATMULS = ("int8", "fp32")  # the image graph's matmuls (image encoder) in an "int8" split engine
SPLIT_ONLY = ("int8-static", "fp16")  # precisions that build the split layout's graphs only


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
        attribute_heads: folder of attribute heads (`sdk.train.attribute_heads --out`) the
            reasoner's visual graph carries, so `sdk.Reasoner` reads a photo's attributes and
            category from them; "auto" adds the committed ones when present; None leaves them out.
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
            keeps the most sensitive ones FP32 as `sdk.export.static_int8.IMAGE_CONV_LADDER` says, each candidate gated
            end to end; when none passes, the convolutions stay FP32.
        calib_images: photos (stratified; the catalog's train split) for the image calibration.
        image_matmuls: "int8" quantizes the image graph's matmuls (the fusion model's image encoder
            and projection) dynamically, as the text graph's; "fp32" keeps them FP32 (precision
            "int8", split layout): the photo vectors are then the FP32 graph's.
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
    samples: str | Path = SAMPLES
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
    attribute_heads: str | Path | None = "auto"
    auto_candidates: tuple[str, ...] = AUTO_CANDIDATES
    auto_rounds: int = 15
    image_convs: str = "fp32"
    image_matmuls: str = "int8"
    calib_images: int = 64
    int8_activations: str = "per-tensor"

    def completion_dir(self) -> Path | None:
        return None if self.layout != "split" else _auto_dir(self.completion, COMPLETION_WEIGHTS,
                                                               "completion.safetensors")

    def reasoner_dir(self) -> Path | None:
        return _auto_dir(self.reasoner, REASONER_WEIGHTS, "reasoner.safetensors")

    def heads_dir(self) -> Path | None:
        """The attribute heads the reasoner's visual graph carries: "auto" is the committed folder, if any."""
        return _auto_dir(self.attribute_heads, ATTRIBUTE_HEADS_WEIGHTS, "heads.safetensors")

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
        if self.image_matmuls not in IMAGE_MATMULS:
            raise ValueError(f"image_matmuls must be one of {IMAGE_MATMULS}, got {self.image_matmuls!r}")
        if self.image_matmuls == "fp32" and (self.precision not in ("int8", "auto") or self.layout != "split"
                                             or self.image_convs != "fp32"):
            raise ValueError(f"image_matmuls 'fp32' needs precision 'int8' (or 'auto'), layout 'split' and image_convs "
                             "'fp32', got "
                             f"precision {self.precision!r}, layout {self.layout!r}, image_convs {self.image_convs!r}")
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


def _auto_dir(value: str | Path | None, committed: Path, marker: str) -> Path | None:
    """A weights folder setting: None stays None, "auto" is `committed` when it holds `marker`
    (else None), anything else is that folder."""
    if value is None:
        return None
    if value == "auto":
        return committed if (committed / marker).is_file() else None
    return Path(value)
