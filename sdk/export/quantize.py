"""Graph-level precision passes of the build: constant folding, FP16 conversion, dynamic INT8 of
MatMul/Gemm (per-tensor or per-token activations), and the INT8 candidates (which text-tower
matmuls stay FP32) that the build tries in order."""

from __future__ import annotations

import re
from pathlib import Path

# "int8" engines' activation scales: one per tensor (per batch) or one per token (sdk.export.per_token)
INT8_ACTIVATIONS = ("per-tensor", "per-token")

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


def text_layer_groups(scopes: dict[str, str]) -> dict[str, list[str]]:
    """Text-graph matmuls grouped by transformer sublayer ("layer 3 attention", "layer 3 ffn in", ...)."""
    groups: dict[str, list[str]] = {}
    for node, scope in sorted(scopes.items()):
        m = re.search(r"encoder\.layer\.(\d+)\.(attention|intermediate|output)", scope)
        name = f"layer {m.group(1)} {dict(attention='attention', intermediate='ffn in', output='ffn out')[m.group(2)]}" \
            if m else "other"
        groups.setdefault(name, []).append(node)
    return groups


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
