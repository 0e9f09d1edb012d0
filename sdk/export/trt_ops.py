"""Which ONNX nodes TensorRT's ONNX parser reads: the check every graph meant for TensorRT passes.

    from sdk.export.trt_ops import trt_unsupported, require_trt_parsable
    problems = trt_unsupported("image.onnx")        # [] when the parser reads every node
    require_trt_parsable("text.onnx", what="text graph")   # ExportError naming the nodes otherwise

Source of the operator list: onnx/onnx-tensorrt, `docs/operators.md` of the TensorRT 10.15 GA
release ("TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"): every
operator of the default ONNX domain marked "Y" there. The parser reads no operator of another
domain without a plugin: onnxruntime's contrib ops (`com.microsoft`: the fused `MultiHeadAttention` and
`Gelu` of the fused text graph, `MatMulNBits`, ...) are refused. Restrictions of that page checked
here: `QuantizeLinear` / `DequantizeLinear` take a zero point that is a constant zero of a quantized
type TensorRT has (INT8, INT4, FP8; no UINT8: without a zero point ONNX means UINT8), and
`MatMulInteger` / `DynamicQuantizeLinear` / `ConvInteger` (onnxruntime's dynamic INT8) are
not supported. Restrictions on attributes and shapes (e.g. Resize modes, `axes` as constants) are
not checked: a plan build on a GPU machine is the final word (`scripts/gpu_check.sh`).

No TensorRT is needed for this check; it reads the graph with `onnx` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRT_VERSION = "10.15"
SOURCE = "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 GA"
OPSETS = (9, 24)  # the default domain's opset versions the parser reads (inclusive)

# The operators marked "Y" in that table.
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual
Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min
Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Unsupported:
    """One node (or the model's opset) the parser would refuse, and why."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


def _load(model):
    import onnx

    return onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model


def _zero_point_problem(node, consts: dict) -> str | None:
    """Why a Q/DQ node's zero point is not one TensorRT takes, or None."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp is None:
        return "no zero point: ONNX then means UINT8, which TensorRT does not quantize to (give an INT8 zero point 0)"
    if zp not in consts:
        return f"zero point {zp!r} is not a constant"
    t = consts[zp]
    if t.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN):
        return f"zero point of type {onnx.TensorProto.DataType.Name(t.data_type)}: TensorRT quantizes to INT8, INT4 or FP8"
    if np.any(numpy_helper.to_array(t).astype(np.float32) != 0):
        return "non-zero zero point (TensorRT quantizes symmetrically)"
    return None


def trt_unsupported(model) -> list[Unsupported]:
    """Every node of `model` (an `onnx.ModelProto` or a path) that TensorRT 10.15's ONNX parser
    would refuse, by operator, domain and the Q/DQ zero-point rule; [] when it reads them all.
    Subgraphs (If / Loop / Scan bodies) are checked as well."""
    m = _load(model)
    out: list[Unsupported] = []
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSETS[0] <= opset <= OPSETS[1]:
        out.append(Unsupported("<model>", "opset", f"default-domain opset {opset} outside {OPSETS[0]}..{OPSETS[1]}"))

    def visit(graph, consts: dict) -> None:
        consts = {**consts, **{t.name: t for t in graph.initializer}}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                consts[n.output[0]] = n.attribute[0].t
        for n in graph.node:
            name = n.name or n.output[0]
            if n.domain not in ("", "ai.onnx"):
                out.append(Unsupported(name, f"{n.domain}.{n.op_type}", "operator of another domain (a contrib op)"))
            elif n.op_type not in SUPPORTED_OPS:
                out.append(Unsupported(name, n.op_type, f"not among the operators TensorRT {TRT_VERSION} parses"))
            elif n.op_type in _QDQ and (why := _zero_point_problem(n, consts)):
                out.append(Unsupported(name, n.op_type, why))
            for a in n.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    visit(g, consts)

    visit(m.graph, {})
    return out


def require_trt_parsable(model, what: str = "graph", show: int = 8) -> None:
    """Raise `ExportError` naming what TensorRT's parser would refuse in `model`, if anything."""
    from sdk.export.onnx_tools import ExportError

    bad = trt_unsupported(model)
    if bad:
        ops = sorted({b.op for b in bad})
        listed = "; ".join(str(b) for b in bad[:show]) + (f"; ... {len(bad) - show} more" if len(bad) > show else "")
        raise ExportError(f"the {what} has {len(bad)} node(s) TensorRT {TRT_VERSION}'s ONNX parser does not read "
                          f"({', '.join(ops)}): {listed}")


def parser_report(parts: dict, show: int = 20) -> dict:
    """For an engine's graphs (name -> path or model): whether TensorRT's parser reads each, and
    what it would refuse (the first `show` nodes and every refused operator), for the build report."""
    out: dict = {"tensorrt": TRT_VERSION, "source": SOURCE}
    for name, model in parts.items():
        bad = trt_unsupported(model)
        out[name] = {"parsable": not bad, "refused_ops": sorted({b.op for b in bad}), "nodes": len(bad),
                     "first": [str(b) for b in bad[:show]]}
    return out
