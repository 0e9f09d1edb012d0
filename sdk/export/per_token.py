"""Per-token activation scales for dynamic INT8 graphs: an item's vector no longer depends on its batch.

ONNX Runtime's dynamic quantization (`DynamicQuantizeLinear`) takes one scale and zero point per
tensor, i.e. per batch: an outlier token of one title coarsens every other title's INT8 grid, and
so do the padding tokens a longer neighbour adds. This pass replaces each `DynamicQuantizeLinear`
by symmetric quantization with one scale per token (per row of the last axis):

    m = max(ReduceMax(x), -ReduceMin(x), eps)     scale = m / 127                (B, T, 1)
    q = QuantizeLinear(x, scale, 128, axis=-1, block_size=K)   one block per row (opset 21)

and each `MatMulInteger(q, W) -> Cast -> Mul(scale * w_scale)` it fed by

    MatMulIntegerToFloat(q, W, 1, w_scale, 128, w_zp) -> Mul(scale)

so a token's output depends on that token alone. Two read-only reductions and one quantizing
pass per input, and ONNX Runtime's fused integer GEMM with the weight scales, keep the cost
close to the per-tensor graph's. (Fed the per-row scale directly, ONNX Runtime's own
MatMulInteger -> MatMulIntegerToFloat fusion would read the first row's scale for every row.)
The graph's default opset is raised to 21 (blocked QuantizeLinear); the operators these graphs
use only gained types between opsets 18 and 21.

    from sdk.export.per_token import per_token_activations
    per_token_activations("text.int8.onnx", "text.int8.rows.onnx")   # -> {"rewritten": 24, ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EPS = 1e-8  # the smallest row max: an all-zero row quantizes to the zero point, not NaN
ZERO_POINT = 128
OPSET = 21  # QuantizeLinear's block_size


def per_token_activations(src: str | Path, dst: str | Path) -> dict:
    """Rewrite every `DynamicQuantizeLinear` in `src` to per-token (last-axis) symmetric scales.

    Returns:
        {"rewritten": quantizers replaced, "matmuls": integer matmuls rewired}.

    Raises:
        ValueError: `src` has no `DynamicQuantizeLinear`, or one feeds something other than the
            MatMulInteger -> Cast -> Mul pattern ONNX Runtime's quantizer writes.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 18:
        raise ValueError(f"{src}: opset {opset}; per-token scales need opset >= 18 (reductions take their axes as "
                         "an input), export with a newer opset")
    init = {t.name: t for t in graph.initializer}
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    quantizers = [n for n in graph.node if n.op_type == "DynamicQuantizeLinear" and n.domain in ("", "ai.onnx")]
    if not quantizers:
        raise ValueError(f"{src}: no DynamicQuantizeLinear node, so no per-tensor activation scale to replace")

    replace: dict[int, list] = {}  # id(old node) -> its replacement nodes ([] drops it)
    consts = {
        "per_token/axis": np.array([-1], np.int64), "per_token/eps": np.array(EPS, np.float32),
        "per_token/inv127": np.array(1.0 / 127.0, np.float32), "per_token/one": np.array(1.0, np.float32),
        "per_token/zero_point": np.array(ZERO_POINT, np.uint8),
    }
    matmuls = 0
    for dq in quantizers:
        x, q, scale = dq.input[0], dq.output[0], dq.output[1]
        zp = dq.output[2] if len(dq.output) > 2 else ""
        p = f"{dq.name or x}/per_token"
        chains = [_chain(mm, users, init, scale, zp, src) for mm in users.get(q, [])]
        covered = {id(c[0]) for c in chains} | {id(c[3]) for c in chains}
        if not chains or any(id(n) not in covered for o in (scale, zp) if o for n in users.get(o, [])):
            raise ValueError(f"{src}: {dq.name!r} feeds nodes other than MatMulInteger -> Cast -> Mul(scale)")
        k = int(init[chains[0][0].input[1]].dims[0])  # the weights' rows: x's last dimension
        replace[id(dq)] = [
            helper.make_node("ReduceMax", [x, "per_token/axis"], [f"{p}/max"], keepdims=1, name=f"{p}/max"),
            helper.make_node("ReduceMin", [x, "per_token/axis"], [f"{p}/min"], keepdims=1, name=f"{p}/min"),
            helper.make_node("Neg", [f"{p}/min"], [f"{p}/neg_min"], name=f"{p}/neg_min"),
            helper.make_node("Max", [f"{p}/max", f"{p}/neg_min", "per_token/eps"], [f"{p}/absmax"], name=f"{p}/absmax"),
            helper.make_node("Mul", [f"{p}/absmax", "per_token/inv127"], [scale], name=f"{p}/scale"),
            helper.make_node("Shape", [scale], [f"{p}/shape"], name=f"{p}/shape"),
            helper.make_node("ConstantOfShape", [f"{p}/shape"], [f"{p}/zero_points"], name=f"{p}/zero_points",
                             value=helper.make_tensor("v", TensorProto.UINT8, [1], [ZERO_POINT])),
            helper.make_node("QuantizeLinear", [x, scale, f"{p}/zero_points"], [q], axis=-1, block_size=k,
                             name=f"{p}/quantize"),
        ]
        for mm, cast, mul, prod, w_scale in chains:
            out = mul.output[0]
            replace[id(mm)] = [
                helper.make_node("MatMulIntegerToFloat", [q, mm.input[1], "per_token/one", w_scale,
                                                          "per_token/zero_point", mm.input[3] if len(mm.input) > 3 else ""],
                                 [f"{out}/weight_scaled"], domain="com.microsoft", name=f"{mm.name or out}/to_float"),
                helper.make_node("Mul", [f"{out}/weight_scaled", scale], [out], name=f"{mm.name or out}/row_scale"),
            ]
            replace[id(cast)] = replace[id(mul)] = []
            replace[id(prod)] = []
            matmuls += 1
    # shapes recorded for the replaced nodes' outputs (the per-tensor scales above all) would now be wrong
    stale = {o for n in graph.node if id(n) in replace for o in n.output}
    nodes = [m for n in graph.node for m in replace.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    _set_opsets(model, {"": OPSET, "com.microsoft": 1})
    onnx.save(model, str(dst))
    return {"rewritten": len(quantizers), "matmuls": matmuls}


def _chain(mm, users, init, scale, zp, src):
    """(MatMulInteger, Cast, Mul, Mul(scale, w_scale), w_scale name) for one consumer of a quantizer."""
    def only(name, op):
        nxt = users.get(name, [])
        if len(nxt) != 1 or nxt[0].op_type != op:
            raise ValueError(f"{src}: {name!r} feeds {[n.op_type for n in nxt]}, not one {op}")
        return nxt[0]

    if mm.op_type != "MatMulInteger" or mm.input[1] not in init or (len(mm.input) > 2 and mm.input[2] != zp):
        raise ValueError(f"{src}: {mm.name!r} ({mm.op_type}) reads a quantized activation; only MatMulInteger with "
                         "initializer weights is rewritten")
    cast = only(mm.output[0], "Cast")
    mul = only(cast.output[0], "Mul")
    product = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    prod = next((n for n in users.get(scale, []) if n.op_type == "Mul" and n.output[0] == product), None)
    if prod is None:
        raise ValueError(f"{src}: {mul.name!r} does not multiply by the activation scale times the weight scale")
    w_scale = prod.input[1] if prod.input[0] == scale else prod.input[0]
    return mm, cast, mul, prod, w_scale


def _set_opsets(model, versions: dict[str, int]) -> None:
    have = {o.domain: o for o in model.opset_import}
    for domain, version in versions.items():
        key = "" if domain in ("", "ai.onnx") else domain
        o = have.get(key) or (have.get("ai.onnx") if key == "" else None)
        if o is None:
            o = model.opset_import.add()
            o.domain = key
        o.version = max(int(o.version), version)
    if model.ir_version < 10:
        model.ir_version = 10
