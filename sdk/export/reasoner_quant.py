"""Quantize the reasoner's graphs: INT4 weight-only (MatMulNBits) or INT8 dynamic, with onnxruntime's tools.

    # reasoner-only engines (no gate; `moon3 build --reasoner-precision` gates and ships), e.g. to
    # compare settings with `python -m sdk.train.eval_reasoner`:
    python -m sdk.export.reasoner_build --out-dir engines --precision fp32 int8 int4 --block-size 32

    int4  onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer: every MatMul with a
          constant weight becomes com.microsoft MatMulNBits (4-bit weights in blocks of `block_size`
          along the input dimension, one scale and zero point per block; activations stay FP32).
    int8  onnxruntime.quantization.quantize_dynamic: MatMul weights INT8 per output channel,
          activations quantized at run time (MatMulInteger / DynamicQuantizeLinear).

Both run on ONNX Runtime's CPU provider, so `sdk.Reasoner` loads a quantized engine unchanged.

What gets quantized (`summarize_graph` records it per part in the manifest):
  * visual graph: the resampler's and the per-layer adapters' matmuls; EfficientNet's
    convolutions stay FP32 (neither tool quantizes Conv weights here);
  * step graph: every decoder layer's qkv, output, FFN in/out projections, and the LM head.
    The LM head is tied to the token embedding (`logits = norm(x) @ embed.weight.T`); the
    exporter writes it as Transpose(embed.weight) -> MatMul. Constant folding turns the transpose
    into a second initializer, which is quantized, while the embedding lookup (Gather) keeps the
    FP32 table. `lm_head=False` leaves the head in FP32 (no folded copy, the weights stay shared).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REASONER_PRECISIONS = ("fp32", "int8", "int4")
QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "GatherBlockQuantized")


@dataclass
class ReasonerQuantConfig:
    """How to quantize the reasoner.

    Attributes:
        precision: "fp32" (nothing), "int8" (dynamic, per channel) or "int4" (weight-only).
        block_size: INT4 block length along a weight's input dimension (a power of 2, >= 16).
        lm_head: quantize the tied LM head too (a folded copy of the embedding table; the table
            itself stays FP32 for the lookup, so this saves no bytes). Off by default: on 300
            validation products INT4 with the head quantized agreed with FP32 on 0.929 of greedy
            tokens, with the head in FP32 on 0.977, for the same engine size.
        accuracy_level: MatMulNBits compute type (None/0: FP32 activations; 4: activations
            quantized to INT8 at run time, the fastest on CPU: 235 vs 347 us per decode step in
            one measurement). INT4 only; the build gate measures the result.
        symmetric: symmetric INT4 blocks (no zero points). INT4 only.
    """

    precision: str = "int4"
    block_size: int = 32
    lm_head: bool = False
    accuracy_level: int | None = 4
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.precision not in REASONER_PRECISIONS:
            raise ValueError(f"reasoner precision must be one of {REASONER_PRECISIONS}, got {self.precision!r}")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"block_size must be a power of 2 >= 16, got {b!r}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be None or 0..4, got {self.accuracy_level!r}")

    def label(self) -> str:
        """e.g. "int4 (block 32, LM head fp32, accuracy level 4)"."""
        if self.precision == "int4":
            extra = f", accuracy level {self.accuracy_level}" if self.accuracy_level is not None else ""
            return f"int4 (block {self.block_size}, LM head {'int4' if self.lm_head else 'fp32'}{extra})"
        return f"int8 (LM head {'int8' if self.lm_head else 'fp32'})" if self.precision == "int8" else "fp32"


def lm_head_nodes(model) -> list[str]:
    """Names of MatMuls whose weight is the transpose of an embedding table (the tied LM head)."""
    inits = {t.name for t in model.graph.initializer}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    transposed = {o for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in tables for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in transposed]


def attribute_head_nodes(model) -> list[str]:
    """Names of the weight MatMuls / Gemms that feed only the visual graph's "attributes" output
    (the attribute heads: small, and their thresholds were picked on FP32 probabilities)."""
    if "attributes" not in {o.name for o in model.graph.output}:
        return []
    reach: dict[str, set[str]] = {o.name: {o.name} for o in model.graph.output}  # tensor -> outputs it feeds
    feeds = [set() for _ in model.graph.node]  # node -> outputs it feeds
    for k in range(len(model.graph.node) - 1, -1, -1):  # the graph is topologically sorted
        node = model.graph.node[k]
        feeds[k] = set().union(*(reach.get(o, set()) for o in node.output))
        for i in node.input:
            reach.setdefault(i, set()).update(feeds[k])
    return [n.name for n, f in zip(model.graph.node, feeds) if n.op_type in ("MatMul", "Gemm") and f == {"attributes"}]


def summarize_graph(path: str | Path) -> dict[str, Any]:
    """Ops holding weights in a graph: quantized ops by type, FP32 MatMul/Gemm with constant weights, bytes."""
    import onnx

    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    ops = Counter(n.op_type for n in model.graph.node)
    # a weight is an initializer, or an initializer read through a Transpose (the unfolded tied head)
    consts = inits | {o for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits for o in n.output}
    fp32 = sum(1 for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts)
    return {"quantized_ops": {k: ops[k] for k in QUANTIZED_OPS if ops[k]}, "fp32_weight_matmuls": fp32,
            "bytes": Path(path).stat().st_size}


def quantize_graph(src: Path, dst: Path, cfg: ReasonerQuantConfig, work: Path) -> Path:
    """One graph: constant folding (onnxruntime's pre-processing), then the quantizer of cfg.precision."""
    import onnx

    from sdk.export.quantize import fold_constants, quantize_int8

    heads = [] if cfg.lm_head else lm_head_nodes(onnx.load(str(src)))
    # Folding would give the head its own FP32 copy of the embedding table; a head kept in FP32
    # stays unfolded, reading the one table through its Transpose. (Every other weight of the step
    # graph is an initializer already; the visual graph has no head and is always folded.)
    graph = src if heads else fold_constants(src, work / f"{src.stem}.folded.onnx")
    heads = heads + attribute_head_nodes(onnx.load(str(graph)))  # the visual graph's attribute heads stay FP32
    if cfg.precision == "int8":
        return quantize_int8(graph, dst, heads)
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    logging.getLogger(mnb.__name__).setLevel(logging.WARNING)  # it logs every node at INFO

    q = mnb.MatMulNBitsQuantizer(onnx.load(str(graph)), bits=4, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                 accuracy_level=cfg.accuracy_level, nodes_to_exclude=heads,
                                 op_types_to_quantize=("MatMul",))
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


def quantize_reasoner(src: str | Path, dst: str | Path, cfg: ReasonerQuantConfig) -> dict[str, Any]:
    """Quantize the visual and step graphs in folder `src` into folder `dst` (same file names).

    Returns:
        The manifest's "quantization" record: settings, tool, and per part what was quantized.
    """
    from .onnx_reasoner import STEP_PART, VISUAL_PART

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    work = dst / "work"
    work.mkdir(exist_ok=True)
    parts = {}
    for name in (VISUAL_PART, STEP_PART):
        out = dst / name
        if cfg.precision == "fp32":
            out.write_bytes((src / name).read_bytes())
        else:
            quantize_graph(src / name, out, cfg, work)
        parts[name] = summarize_graph(out)
    tool = {"fp32": None, "int8": "onnxruntime.quantization.quantize_dynamic (per channel, MatMul)",
            "int4": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer (weight-only, blockwise)"}
    return {"precision": cfg.precision, "label": cfg.label(), "tool": tool[cfg.precision], "config": asdict(cfg),
            "parts": parts}
