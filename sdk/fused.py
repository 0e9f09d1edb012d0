"""The embedder head's fused ops: a NumPy reference each, the compiled `sdk._C` kernel when present.

    fusion_epilogue    gate softmax over the present modalities -> gate-weighted sum of the
                       per-modality attention outputs -> output projection -> residual add ->
                       LayerNorm (the next FFN's input)
    fire_residual      FIRE on a block of visual tokens: h += s * sigmoid(w^T GELU(W LN(h))) * MLP(shallow)
                       (not called by the runtime: FIRE runs inside the ONNX image graph; kept,
                       with its CUDA twin in sdk.cuda_ops, for a runtime that runs the image tail)
    project_normalize  LayerNorm -> projection to the embedding -> Matryoshka truncation -> L2 norm

Each reference mirrors the PyTorch modules of `sdk.train.fusion_model` (LayerNorm eps 1e-5, exact
erf GELU, the same finite mask value), in float32. The compiled kernels agree with the references
to within `FUSED_ATOL` per element. Like `sdk.ops`, the compiled path is chosen at each call
(`sdk.ops.HAVE_C`; MOON3_DISABLE_C=1 turns it off) and the reference is the fallback. This module
never imports torch.

Buffers: the compiled kernels read C-contiguous float32 arrays where they lie; the wrappers here
copy any other input (another dtype, a strided view) into one first, so pass C-contiguous float32
arrays to avoid copies (`sdk._C` itself refuses them). Each op takes an optional `out=` (for
`fusion_epilogue` a tuple) that receives the result in place and is returned, on both paths: a
C-contiguous float32 array of exactly the result's shape that overlaps no input, except the one
in-place alias each op documents (`q_new` may be `q`, FIRE's `out` may be `h`, the projection's
`out` may be `q`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from sdk import ops
from sdk.errors import InvalidInputError

__all__ = [
    "FUSED_ATOL", "LN_EPS", "NEG", "FireParams", "erf", "fire_residual", "fire_residual_ref",
    "fusion_epilogue", "fusion_epilogue_ref", "gelu", "layer_norm", "linear", "project_normalize",
    "project_normalize_ref",
]

LN_EPS = 1e-5  # torch.nn.LayerNorm's default
NEG = -1e4  # additive mask value of sdk.train.fusion_model (finite: a fully masked row stays NaN-free)
# Max |compiled - reference| per element, on unit-scale inputs: float32 sums in other orders, and
# the compiled GELU's erf against the reference's (both within 2e-7 of the exact one).
FUSED_ATOL = 2e-5

_F32 = np.float32


def erf(x: np.ndarray) -> np.ndarray:
    """Error function, elementwise, float32 (Abramowitz & Stegun 7.1.26: |error| < 1.5e-7)."""
    x = np.asarray(x, _F32)
    a = np.abs(x)
    t = 1.0 / (1.0 + _F32(0.3275911) * a)
    poly = t * (_F32(0.254829592) + t * (_F32(-0.284496736) + t * (_F32(1.421413741)
           + t * (_F32(-1.453152027) + t * _F32(1.061405429)))))
    y = 1.0 - poly * np.exp(-a * a)
    return np.copysign(y, x).astype(_F32, copy=False)


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU with the erf form (torch.nn.GELU's default)."""
    return (_F32(0.5) * x * (_F32(1.0) + erf(x * _F32(0.7071067811865476)))).astype(_F32, copy=False)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, as torch)."""
    mu = x.mean(-1, keepdims=True, dtype=_F32)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True, dtype=_F32)
    return (xc / np.sqrt(var + _F32(eps)) * w + b).astype(_F32, copy=False)


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T + b`` for x (..., k) and w (m, k) (PyTorch's layout), float32.

    The compiled kernel runs on the calling thread, so it never competes with ONNX Runtime's
    thread pool the way a multi-threaded BLAS does (measured: a text query took 5x longer with
    NumPy's OpenBLAS threads spinning beside ONNX Runtime's).
    """
    if ops.HAVE_C:
        return ops._C.linear(*_f32c(x, w), None if b is None else np.ascontiguousarray(b, _F32))
    y = np.asarray(x, _F32) @ np.asarray(w, _F32).T
    return y if b is None else (y + b).astype(_F32, copy=False)


def _softmax_present(logits: np.ndarray, present: np.ndarray) -> np.ndarray:
    z = logits + (_F32(1.0) - present) * _F32(NEG)  # (B, M)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(_F32, copy=False)


def fusion_epilogue_ref(q, outs, logits, present, out_w, out_b, ln_w, ln_b):
    """Reference of `fusion_epilogue` (same arguments and results)."""
    gate = _softmax_present(logits, present)  # (B, M)
    fused = np.einsum("bm,bmd->bd", gate, outs).astype(_F32)  # (B, d)
    q_new = (q + fused @ out_w.T + out_b).astype(_F32)  # (B, d)
    return q_new, layer_norm(q_new, ln_w, ln_b), gate


def fusion_epilogue(q, outs, logits, present, out_w, out_b, ln_w, ln_b, *, out=None):
    """The end of one modality-fusion round, fused.

    Inputs that are not C-contiguous float32 arrays are copied into one first.

    Args:
        q: (B, d) query state before the round.
        outs: (B, M, d) per-modality attention outputs (after each attention's own projection).
        logits: (B, M) gate logits; present: (B, M) 0/1 modality presence (absent ones get weight 0).
        out_w: (d, d), out_b: (d,) the round's zero-initialised output projection.
        ln_w, ln_b: (d,) the LayerNorm of the FFN that follows.
        out: optional tuple (q_new, h, gate) of arrays to write the results into, each None (a
            fresh array) or C-contiguous float32 of the result's shape. `q_new` may be `q` itself
            (the residual update in place); nothing else may overlap an input or another output.

    Returns:
        (q_new (B, d), LayerNorm(q_new) (B, d), gate weights (B, M)), float32 C-contiguous; the
        given `out` arrays in their places.

    Raises:
        InvalidInputError: `out` is not a 3-tuple, or one of its arrays has the wrong type, dtype,
            shape or layout, is read-only, or overlaps an input or another output.
    """
    args = (q, outs, logits, present, out_w, out_b, ln_w, ln_b)
    xs = _f32c(*args)
    if out is not None:
        if not (isinstance(out, tuple) and len(out) == 3):
            got = f"a tuple of length {len(out)}" if isinstance(out, tuple) else type(out).__name__
            raise InvalidInputError(f"out must be a 3-tuple (q_new, h, gate), each an array or None, got {got}")
        others = dict(zip(("q", "outs", "logits", "present", "out_w", "out_b", "ln_w", "ln_b"), args))
        q_in = others.pop("q")
        for k, (name, shape) in enumerate((("out[0] (q_new)", xs[0].shape), ("out[1] (h)", xs[0].shape),
                                           ("out[2] (gate)", xs[2].shape))):
            if out[k] is not None:
                _check_out(out[k], name, shape, others, alias=("q", q_in) if k == 0 else None)
                others[name] = out[k]
            if k == 0:
                others["q"] = q_in
    if ops.HAVE_C:
        return ops._C.fusion_epilogue(*xs, out)
    got = fusion_epilogue_ref(*xs)
    if out is None:
        return got
    return tuple(r if o is None else _put(o, r) for o, r in zip(out, got))


@dataclass(frozen=True)
class FireParams:
    """Weights of one FIRE block (`sdk.train.fusion_model.FIRE`), float32 C-contiguous.

    norm_w/norm_b (d,); gate_in_w (H, d), gate_in_b (H,); gate_out_w (H,), gate_out_b ();
    mlp_norm_w/mlp_norm_b (Cs,); mlp_in_w (H, Cs), mlp_in_b (H,); mlp_out_w (d, H), mlp_out_b (d,);
    scale ().
    """

    norm_w: np.ndarray
    norm_b: np.ndarray
    gate_in_w: np.ndarray
    gate_in_b: np.ndarray
    gate_out_w: np.ndarray
    gate_out_b: float
    mlp_norm_w: np.ndarray
    mlp_norm_b: np.ndarray
    mlp_in_w: np.ndarray
    mlp_in_b: np.ndarray
    mlp_out_w: np.ndarray
    mlp_out_b: np.ndarray
    scale: float

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], prefix: str) -> "FireParams":
        """From a FIRE module's state dict entries under `prefix` (e.g. "image.fire.1.")."""
        g = lambda k: np.ascontiguousarray(state[prefix + k], _F32)  # noqa: E731
        return cls(
            g("norm.weight"), g("norm.bias"), g("gate_in.weight"), g("gate_in.bias"),
            g("gate_out.weight").reshape(-1), float(g("gate_out.bias").reshape(())),
            g("mlp.0.weight"), g("mlp.0.bias"), g("mlp.1.weight"), g("mlp.1.bias"),
            g("mlp.3.weight"), g("mlp.3.bias"), float(g("scale").reshape(())),
        )


def fire_residual_ref(h: np.ndarray, shallow: np.ndarray, p: FireParams) -> np.ndarray:
    """Reference of `fire_residual` (same arguments and result)."""
    g = gelu(layer_norm(h, p.norm_w, p.norm_b) @ p.gate_in_w.T + p.gate_in_b)  # (..., N, H)
    a = 1.0 / (1.0 + np.exp(-(g @ p.gate_out_w + _F32(p.gate_out_b))))  # (..., N)
    m = gelu(layer_norm(shallow, p.mlp_norm_w, p.mlp_norm_b) @ p.mlp_in_w.T + p.mlp_in_b)  # (..., N, H)
    m = m @ p.mlp_out_w.T + p.mlp_out_b  # (..., N, d)
    return (h + _F32(p.scale) * a[..., None].astype(_F32) * m).astype(_F32)


def fire_residual(h: np.ndarray, shallow: np.ndarray, p: FireParams, *, out: np.ndarray | None = None) -> np.ndarray:
    """FIRE residual enhancement of visual tokens, fused.

    Inputs that are not C-contiguous float32 arrays are copied into one first.

    Args:
        h: (..., N, d) deep token states; shallow: (..., N, Cs) shallow tokens at the same positions.
        p: the block's weights.
        out: optional C-contiguous float32 array of h's shape to write the result into. It may be
            `h` itself (``h += ...`` in place) but must not otherwise overlap an input.

    Returns:
        (..., N, d) float32: ``h + scale * sigmoid(w^T GELU(W LN(h))) * MLP(shallow)``; `out` when given.

    Raises:
        InvalidInputError: `out` has the wrong type, dtype, shape or layout, is read-only, or
            overlaps an input other than `h`.
    """
    hh, ss = _f32c(h, shallow)
    if out is not None:
        others = {"shallow": shallow, **{f.name: getattr(p, f.name) for f in fields(p)}}
        _check_out(out, "out", hh.shape, others, alias=("h", h))
    if ops.HAVE_C:
        lead = hh.shape[:-1]
        res = ops._C.fire_residual(
            hh.reshape(-1, hh.shape[-1]), ss.reshape(-1, ss.shape[-1]),
            *_f32c(p.norm_w, p.norm_b, p.gate_in_w, p.gate_in_b, p.gate_out_w), p.gate_out_b,
            *_f32c(p.mlp_norm_w, p.mlp_norm_b, p.mlp_in_w, p.mlp_in_b, p.mlp_out_w, p.mlp_out_b), p.scale,
            None if out is None else out.reshape(-1, out.shape[-1]),  # a view: out is C-contiguous
        )
        return res.reshape(*lead, res.shape[-1]) if out is None else out
    res = fire_residual_ref(hh, ss, p)
    return res if out is None else _put(out, res)


def project_normalize_ref(q, ln_w, ln_b, w, b, dim: int) -> np.ndarray:
    """Reference of `project_normalize` (same arguments and result)."""
    e = layer_norm(q, ln_w, ln_b) @ w[:dim].T + b[:dim]  # (B, dim)
    return ops.l2_normalize_ref(e)


def project_normalize(q, ln_w, ln_b, w, b, dim: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Final LayerNorm -> projection -> Matryoshka truncation -> L2 normalisation, fused.

    Only the first `dim` output rows of the projection are computed (a truncated prefix,
    re-normalised, is the Matryoshka embedding). Inputs that are not C-contiguous float32 arrays
    are copied into one first.

    Args:
        q: (B, d); ln_w, ln_b: (d,); w: (D, d) projection, b: (D,); dim: in [1, D].
        out: optional C-contiguous float32 (B, dim) array to write the result into. It may be `q`
            itself (when dim == d; q is read whole before out is written) but must not otherwise
            overlap an input.

    Returns:
        (B, dim) float32, rows of unit norm (zero rows stay zero); `out` when given.

    Raises:
        InvalidInputError: `out` has the wrong type, dtype, shape or layout, is read-only, or
            overlaps an input other than `q`.
    """
    xs = _f32c(q, ln_w, ln_b, w, b)
    dim = int(dim)
    if out is not None:
        _check_out(out, "out", (*xs[0].shape[:-1], dim), {"ln_w": ln_w, "ln_b": ln_b, "w": w, "b": b}, alias=("q", q))
    if ops.HAVE_C:
        return ops._C.project_normalize(*xs, dim, out)
    res = project_normalize_ref(*xs, dim)
    return res if out is None else _put(out, res)


def _f32c(*arrays):
    """The arrays as C-contiguous aligned float32, each copied only where it is not one already."""
    out = tuple(np.ascontiguousarray(a, _F32) for a in arrays)
    if all(a.flags.aligned for a in out):
        return out
    return tuple(a if a.flags.aligned else a.copy() for a in out)


def _same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.flags.c_contiguous and b.flags.c_contiguous
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _check_out(out, name: str, shape: tuple, others: dict, alias: tuple[str, object] | None = None) -> None:
    """Refuse an `out` the result cannot be written into as given, naming what to pass instead.

    `others` (name -> caller's argument) must not overlap `out`; `alias` (name, argument) may be
    the very same buffer (where the op works in place) but must not otherwise overlap it. The same
    checks and messages as sdk._C's, so the compiled and reference paths refuse alike.
    """
    fix = f"; allocate it with np.empty({tuple(shape)}, np.float32)"
    if not isinstance(out, np.ndarray):
        raise InvalidInputError(f"{name} must be a numpy.ndarray or None, got {type(out).__name__}")
    if out.dtype != _F32:  # a byte-swapped float32 too
        raise InvalidInputError(f"{name} must have dtype float32 (native byte order), got {out.dtype}{fix}")
    if out.shape != tuple(shape):
        raise InvalidInputError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if not (out.flags.c_contiguous and out.flags.aligned):
        raise InvalidInputError(f"{name} must be C-contiguous and aligned: the result is written into it{fix}")
    if not out.flags.writeable:
        raise InvalidInputError(f"{name} is read-only; pass a writeable array")
    hint = f" (or {alias[0]} itself, to work in place)" if alias else ""
    for other, a in others.items():
        if isinstance(a, np.ndarray) and np.may_share_memory(out, a):
            raise InvalidInputError(f"{name} overlaps {other}; pass a separate buffer{hint}")
    if alias and isinstance(alias[1], np.ndarray) and np.may_share_memory(out, alias[1]) \
            and not _same_buffer(out, alias[1]):
        raise InvalidInputError(f"{name} overlaps {alias[0]}; pass a separate buffer{hint}")


def _put(out: np.ndarray, result: np.ndarray) -> np.ndarray:
    out[...] = result
    return out
