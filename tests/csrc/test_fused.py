"""The head's fused ops: sdk._C (both kernels) and sdk.fused against their NumPy references."""

import dataclasses
import math
import re

import numpy as np
import pytest
from fused_cases import epilogue_args, fire_params, rand

from sdk import fused, ops
from sdk.errors import InvalidInputError
from sdk.fused import (
    FUSED_ATOL,
    fire_residual_ref,
    fusion_epilogue_ref,
    gelu,
    project_normalize_ref,
)

KERNELS = pytest.mark.parametrize("force_scalar", [False, True], ids=["dispatched", "scalar"])
# (batch, d): batch 1 and larger, widths not multiples of 8 (kernel tails), the real d=256
SHAPES = [(1, 256), (3, 36), (5, 13), (17, 64), (32, 256)]


@pytest.fixture(scope="module")
def C():
    return pytest.importorskip("sdk._C")


def fire_c(C, h, s, p, force_scalar, out=None):
    return C.fire_residual(h, s, p.norm_w, p.norm_b, p.gate_in_w, p.gate_in_b, p.gate_out_w, p.gate_out_b,
                           p.mlp_norm_w, p.mlp_norm_b, p.mlp_in_w, p.mlp_in_b, p.mlp_out_w, p.mlp_out_b, p.scale,
                           out, force_scalar=force_scalar)


# --- references against first principles -------------------------------------------------------


def test_gelu_matches_the_erf_form():
    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(gelu(x), exact, rtol=0, atol=1e-6)


def test_epilogue_reference_gives_absent_modalities_zero_weight():
    q, outs, logits, present, *rest = epilogue_args(4, 16)
    present[:] = [1, 0, 1]
    q_new, h, gate = fusion_epilogue_ref(q, outs, logits, present, *rest)
    assert np.all(gate[:, 1] == 0.0)
    np.testing.assert_allclose(gate.sum(1), 1.0, atol=1e-6)
    outs2 = outs.copy()
    outs2[:, 1] = 1e3  # an absent modality's output cannot leak in
    np.testing.assert_array_equal(fusion_epilogue_ref(q, outs2, logits, present, *rest)[0], q_new)
    ln_w, ln_b = rest[2], rest[3]
    z = (h - ln_b) / ln_w  # LayerNorm(q_new) undone: zero mean, unit variance per row
    np.testing.assert_allclose(z.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.var(1), 1.0, atol=1e-3)


# --- sdk._C against the references -------------------------------------------------------------


@KERNELS
@pytest.mark.parametrize(("batch", "d"), SHAPES)
def test_fusion_epilogue_matches_reference(C, batch, d, force_scalar):
    args = epilogue_args(batch, d, seed=batch + d)
    before = [a.copy() for a in args]
    got = C.fusion_epilogue(*args, force_scalar=force_scalar)
    want = fusion_epilogue_ref(*args)
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=FUSED_ATOL)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)  # inputs untouched


@KERNELS
@pytest.mark.parametrize(("rows", "d", "Cs", "H"), [(1, 256, 152, 128), (49, 256, 152, 128), (7, 36, 13, 9),
                                                    (98, 32, 8, 16), (3, 5, 3, 1)])
def test_fire_residual_matches_reference(C, rows, d, Cs, H, force_scalar):
    rng = np.random.default_rng(rows)
    h, s, p = rand(rng, rows, d), rand(rng, rows, Cs), fire_params(d, Cs, H, seed=d)
    got = fire_c(C, h, s, p, force_scalar)
    np.testing.assert_allclose(got, fire_residual_ref(h, s, p), rtol=0, atol=FUSED_ATOL)


@KERNELS
@pytest.mark.parametrize(("batch", "d"), SHAPES)
@pytest.mark.parametrize("dim", [1, 7, 64, None])
def test_project_normalize_matches_reference(C, batch, d, dim, force_scalar):
    rng = np.random.default_rng(batch * d)
    D = 2 * d + 3
    dim = D if dim is None else min(dim, D)
    q, w, b = rand(rng, batch, d), rand(rng, D, d, scale=1 / math.sqrt(d)), rand(rng, D)
    lw, lb = 1 + rand(rng, d, scale=0.1), rand(rng, d, scale=0.1)
    got = C.project_normalize(q, lw, lb, w, b, dim, force_scalar=force_scalar)
    np.testing.assert_allclose(got, project_normalize_ref(q, lw, lb, w, b, dim), rtol=0, atol=FUSED_ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_kernel_name(C):
    assert C.fused_kernel() in ("avx2", "scalar")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda C, a: C.fusion_epilogue(np.ascontiguousarray(a[0][:, :-1]), *a[1:]), "outs must have shape"),
        (lambda C, a: C.fusion_epilogue(a[0], a[1], np.ascontiguousarray(a[2][:, :2]), *a[3:]),
         "logits must have shape"),
        (lambda C, a: C.fusion_epilogue(*a[:4], a[4][:-1], *a[5:]), "out_w must have shape"),
        (lambda C, a: C.fusion_epilogue(a[0][0], *a[1:]), "q must be (B, d)"),
        (lambda C, a: C.project_normalize(a[0], a[6], a[7], a[4], a[5], 0), "dim must be in"),
        (lambda C, a: C.project_normalize(a[0], a[6], a[7], a[4], a[5][:-1], 4), "b must have shape"),
    ],
)
def test_bad_shapes_raise_value_error(C, call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(C, epilogue_args(2, 16))


def test_fire_bad_shapes(C):
    rng = np.random.default_rng(0)
    p = fire_params(16, 8, 4)
    with pytest.raises(ValueError, match="shallow must have shape"):
        fire_c(C, rand(rng, 3, 16), rand(rng, 2, 8), p, False)
    with pytest.raises(ValueError, match="mlp_out_w must have shape"):
        fire_c(C, rand(rng, 3, 16), rand(rng, 3, 8), dataclasses.replace(p, mlp_out_w=rand(rng, 15, 4)), False)


# --- sdk.fused dispatch ---------------------------------------------------------------------------


@pytest.mark.parametrize("have_c", [True, False], ids=["compiled", "reference"])
def test_dispatch_gives_the_reference_results(monkeypatch, have_c):
    if have_c and not ops.HAVE_C:
        pytest.skip("sdk._C is not built")
    monkeypatch.setattr(ops, "HAVE_C", have_c)
    args = epilogue_args(3, 24)
    for g, w in zip(fused.fusion_epilogue(*args), fusion_epilogue_ref(*args)):
        np.testing.assert_allclose(g, w, rtol=0, atol=FUSED_ATOL)
    rng = np.random.default_rng(1)
    h, s, p = rand(rng, 2, 49, 24), rand(rng, 2, 49, 8), fire_params(24, 8, 16)
    got = fused.fire_residual(h, s, p)
    assert got.shape == (2, 49, 24)
    np.testing.assert_allclose(got, fire_residual_ref(h, s, p), rtol=0, atol=FUSED_ATOL)
    q, w, b = rand(rng, 4, 24), rand(rng, 40, 24), rand(rng, 40)
    lw, lb = np.ones(24, np.float32), np.zeros(24, np.float32)
    np.testing.assert_allclose(fused.project_normalize(q, lw, lb, w, b, 16),
                               project_normalize_ref(q, lw, lb, w, b, 16), rtol=0, atol=FUSED_ATOL)


# --- caller buffers: out= and inputs that are not C-contiguous float32 ---------------------------
# Batch 1 and widths that are not multiples of 8; fire: (rows, d, Cs, H).
OUT_SHAPES = [(1, 256), (1, 13), (5, 13), (17, 36)]
FIRE_SHAPES = [(1, 256, 152, 128), (1, 13, 5, 3), (19, 36, 13, 9)]


def project_args(batch, d, seed=0):
    """(q, ln_w, ln_b, w, b) with w (2d + 3, d): dim == d keeps q's shape (the in-place case)."""
    rng = np.random.default_rng(seed)
    return (rand(rng, batch, d), 1 + rand(rng, d, scale=0.1), rand(rng, d, scale=0.1),
            rand(rng, 2 * d + 3, d, scale=1 / math.sqrt(d)), rand(rng, 2 * d + 3))


def nan_like(a):
    return np.full(a.shape, np.nan, np.float32)


def overlapping(shape, shift):
    """Two C-contiguous float32 arrays of `shape` in one buffer, the second `shift` floats later."""
    n = math.prod(shape)
    buf = np.zeros(n + shift, np.float32)
    return buf[:n].reshape(shape), buf[shift:].reshape(shape)


@KERNELS
@pytest.mark.parametrize(("batch", "d"), OUT_SHAPES)
def test_c_epilogue_writes_out_and_returns_it(C, batch, d, force_scalar):
    args = epilogue_args(batch, d, seed=d)
    want = C.fusion_epilogue(*args, force_scalar=force_scalar)
    out = tuple(nan_like(w) for w in want)
    got = C.fusion_epilogue(*args, out, force_scalar=force_scalar)
    assert all(g is o for g, o in zip(got, out))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    h = nan_like(want[1])  # only some given: the others are fresh
    got = C.fusion_epilogue(*args, out=(None, h, None), force_scalar=force_scalar)
    assert got[1] is h and got[0] is not out[0]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@KERNELS
@pytest.mark.parametrize(("batch", "d"), OUT_SHAPES)
def test_c_epilogue_updates_q_in_place(C, batch, d, force_scalar):
    q, *rest = epilogue_args(batch, d, seed=d)
    want = fusion_epilogue_ref(q.copy(), *rest)
    got = C.fusion_epilogue(q, *rest, (q, None, None), force_scalar=force_scalar)
    assert got[0] is q
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=FUSED_ATOL)


@KERNELS
@pytest.mark.parametrize(("rows", "d", "Cs", "H"), FIRE_SHAPES)
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "out=h"])
def test_c_fire_writes_out_and_returns_it(C, rows, d, Cs, H, in_place, force_scalar):
    rng = np.random.default_rng(d)
    h, s, p = rand(rng, rows, d), rand(rng, rows, Cs), fire_params(d, Cs, H, seed=Cs)
    want = fire_residual_ref(h.copy(), s, p)
    out = h if in_place else nan_like(h)
    assert fire_c(C, h, s, p, force_scalar, out) is out
    np.testing.assert_allclose(out, want, rtol=0, atol=FUSED_ATOL)


@KERNELS
@pytest.mark.parametrize(("batch", "d"), OUT_SHAPES)
@pytest.mark.parametrize(("dim", "in_place"), [(1, False), (7, False), (None, False), (None, True)],
                         ids=["dim1", "dim7", "full", "full-out=q"])  # None: d, where out may be q
def test_c_project_writes_out_and_returns_it(C, batch, d, dim, in_place, force_scalar):
    q, *rest = project_args(batch, d, seed=batch)
    dim = d if dim is None else dim
    want = project_normalize_ref(q.copy(), *rest, dim)
    out = q if in_place else np.full((batch, dim), np.nan, np.float32)
    assert C.project_normalize(q, *rest, dim, out, force_scalar=force_scalar) is out
    np.testing.assert_allclose(out, want, rtol=0, atol=FUSED_ATOL)


def _readonly(shape):
    a = np.zeros(shape, np.float32)
    a.setflags(write=False)
    return a


B, D = 2, 16  # the refusal cases' shapes (epilogue_args(B, D), project_args(B, D))
# (call(op, epilogue args, project args, fire (h, s, p)) -> raises, message); `op` is sdk._C's or
# sdk.fused's function set, behind the same signature (see `_Ops`).
OUT_REFUSALS = {
    "not-a-tuple": (lambda o, a, pa, f: o.epilogue(a, np.zeros((B, D), np.float32)),
                    "out must be a 3-tuple (q_new, h, gate), each an array or None, got ndarray"),
    "tuple-of-2": (lambda o, a, pa, f: o.epilogue(a, (None, None)), "got a tuple of length 2"),
    "not-an-array": (lambda o, a, pa, f: o.epilogue(a, ([[0.0] * D] * B, None, None)),
                     "out[0] (q_new) must be a numpy.ndarray or None, got list"),
    "float64": (lambda o, a, pa, f: o.epilogue(a, (None, np.zeros((B, D)), None)),
                "out[1] (h) must have dtype float32 (native byte order), got float64; "
                f"allocate it with np.empty(({B}, {D}), np.float32)"),
    "byte-swapped": (lambda o, a, pa, f: o.project(pa, D, np.zeros((B, D), ">f4")),
                     "out must have dtype float32 (native byte order), got >f4"),
    "shape": (lambda o, a, pa, f: o.epilogue(a, (None, None, np.zeros((B, 4), np.float32))),
              "out[2] (gate) must have shape (2, 3), got (2, 4)"),
    "project-shape": (lambda o, a, pa, f: o.project(pa, 5, np.zeros((B, D), np.float32)),
                      "out must have shape (2, 5), got (2, 16)"),
    "fire-shape": (lambda o, a, pa, f: o.fire(f, np.zeros((3, D), np.float32)),
                   "out must have shape (2, 16), got (3, 16)"),
    "strided": (lambda o, a, pa, f: o.epilogue(a, (np.zeros((B, 2 * D), np.float32)[:, ::2], None, None)),
                "out[0] (q_new) must be C-contiguous and aligned: the result is written into it; "
                f"allocate it with np.empty(({B}, {D}), np.float32)"),
    "fortran": (lambda o, a, pa, f: o.fire(f, np.zeros((D, B), np.float32).T), "out must be C-contiguous and aligned"),
    "read-only": (lambda o, a, pa, f: o.project(pa, 3, _readonly((B, 3))), "out is read-only; pass a writeable array"),
    "h-is-q": (lambda o, a, pa, f: o.epilogue(a, (None, a[0], None)), "out[1] (h) overlaps q; pass a separate buffer"),
    "h-is-q_new": (lambda o, a, pa, f: (lambda x: o.epilogue(a, (x, x, None)))(np.zeros((B, D), np.float32)),
                   "out[1] (h) overlaps out[0] (q_new)"),
    "gate-is-logits": (lambda o, a, pa, f: o.epilogue(a, (None, None, a[2])), "out[2] (gate) overlaps logits"),
    "q_new-in-out_w": (lambda o, a, pa, f: o.epilogue(a, (a[4][:B], None, None)),
                       "out[0] (q_new) overlaps out_w; pass a separate buffer (or q itself, to work in place)"),
    "q_new-shifted-q": (lambda o, a, pa, f: (lambda qs: o.epilogue((qs[0], *a[1:]), (qs[1], None, None)))(
        overlapping((B, D), 3)), "out[0] (q_new) overlaps q; pass a separate buffer (or q itself, to work in place)"),
    "fire-in-shallow": (lambda o, a, pa, f: (lambda buf: o.fire((f[0], buf.reshape(-1)[:B * 8].reshape(B, 8), f[2]),
                                                                buf))(np.zeros((B, D), np.float32)),
                        "out overlaps shallow"),
    "fire-shifted-h": (lambda o, a, pa, f: (lambda hs: o.fire((hs[0], *f[1:]), hs[1]))(overlapping((B, D), D)),
                       "out overlaps h; pass a separate buffer (or h itself, to work in place)"),
    "project-in-w": (lambda o, a, pa, f: o.project(pa, D, pa[3][1:1 + B]),
                     "out overlaps w; pass a separate buffer (or q itself, to work in place)"),
    "project-shifted-q": (lambda o, a, pa, f: (lambda qs: o.project((qs[0], *pa[1:]), D, qs[1]))(
        overlapping((B, D), 1)), "out overlaps q; pass a separate buffer (or q itself, to work in place)"),
}


class _Ops:
    """sdk._C's ops or sdk.fused's behind one signature: (args..., out)."""

    def __init__(self, C=None):
        self.C = C

    def epilogue(self, a, out):
        return self.C.fusion_epilogue(*a, out) if self.C else fused.fusion_epilogue(*a, out=out)

    def project(self, pa, dim, out):
        return self.C.project_normalize(*pa, dim, out) if self.C else fused.project_normalize(*pa, dim, out=out)

    def fire(self, f, out):
        h, s, p = f
        return fire_c(self.C, h, s, p, False, out) if self.C else fused.fire_residual(h, s, p, out=out)


def _refusal_inputs():
    rng = np.random.default_rng(0)
    return epilogue_args(B, D), project_args(B, D), (rand(rng, B, D), rand(rng, B, 8), fire_params(D, 8, 4))


@pytest.mark.parametrize("case", list(OUT_REFUSALS))
def test_c_refuses_bad_out(C, case):
    call, message = OUT_REFUSALS[case]
    a, pa, f = _refusal_inputs()
    before = [x.copy() for x in (*a, *pa, f[0], f[1])]
    kind = TypeError if case in ("not-a-tuple", "tuple-of-2", "not-an-array", "float64", "byte-swapped") else ValueError
    with pytest.raises(kind, match=re.escape(message)):
        call(_Ops(C), a, pa, f)
    for x, y in zip((*a, *pa, f[0], f[1]), before):
        np.testing.assert_array_equal(x, y)  # nothing written before the refusal


@pytest.mark.parametrize(
    ("call", "kind", "message"),
    [
        (lambda C, a: C.fusion_epilogue(a[0].astype(np.float64), *a[1:]), TypeError,
         "q must have dtype float32 (native byte order), got float64 (2, 16); pass q.astype(np.float32), "
         "or call sdk.fused, which converts (copying)"),
        (lambda C, a: C.fusion_epilogue(*a[:4], np.asfortranarray(a[4]), *a[5:]), ValueError,
         "out_w must be C-contiguous, got a strided (16, 16) view; pass np.ascontiguousarray(out_w), "
         "or call sdk.fused, which copies it"),
        (lambda C, a: C.fusion_epilogue(a[0], a[1][:, ::2], *a[2:]), ValueError, "outs must be C-contiguous"),
        (lambda C, a: C.project_normalize(a[0].tolist(), *a[6:], a[4], a[5], 4), TypeError,
         "q must be a numpy.ndarray of float32, got list"),
        (lambda C, a: C.project_normalize(a[0], a[6], a[7], a[4], a[5].astype(np.float16), 4), TypeError,
         "b must have dtype float32"),
        (lambda C, a: fire_c(C, a[0], np.zeros((B, 16), np.float32)[:, ::2], fire_params(D, 8, 4), False),
         ValueError, "shallow must be C-contiguous"),
    ],
    ids=["float64-q", "fortran-out_w", "strided-outs", "list-q", "float16-b", "strided-shallow"],
)
def test_c_refuses_inputs_it_would_have_to_copy(C, call, kind, message):
    with pytest.raises(kind, match=re.escape(message)):
        call(C, epilogue_args(B, D))


@pytest.fixture(params=[True, False], ids=["compiled", "reference"])
def path(request, monkeypatch):
    """sdk.fused with sdk._C on, or with the NumPy reference forced."""
    if request.param and not ops.HAVE_C:
        pytest.skip("sdk._C is not built")
    monkeypatch.setattr(ops, "HAVE_C", request.param)
    return request.param


@pytest.mark.parametrize("case", list(OUT_REFUSALS))
def test_wrappers_refuse_bad_out_on_both_paths(path, case):
    call, message = OUT_REFUSALS[case]
    a, pa, f = _refusal_inputs()
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        call(_Ops(), a, pa, f)


@pytest.mark.parametrize(("batch", "d"), OUT_SHAPES)
def test_wrapper_epilogue_out(path, batch, d):
    args = epilogue_args(batch, d, seed=d)
    want = fusion_epilogue_ref(*args)
    out = tuple(nan_like(w) for w in want)
    got = fused.fusion_epilogue(*args, out=out)
    assert all(g is o for g, o in zip(got, out))
    gate = nan_like(want[2])
    partial = fused.fusion_epilogue(*args, out=(None, None, gate))
    assert partial[2] is gate
    q = args[0].copy()
    in_place = fused.fusion_epilogue(q, *args[1:], out=(q, None, None))
    assert in_place[0] is q
    for result in (got, partial, in_place):
        for g, w in zip(result, want):
            assert g.dtype == np.float32 and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=0, atol=FUSED_ATOL)


@pytest.mark.parametrize(("rows", "d", "Cs", "H"), FIRE_SHAPES)
@pytest.mark.parametrize("lead", [(), (2,)], ids=["2d", "lead"])
def test_wrapper_fire_out(path, rows, d, Cs, H, lead):
    rng = np.random.default_rng(rows)
    h, s, p = rand(rng, *lead, rows, d), rand(rng, *lead, rows, Cs), fire_params(d, Cs, H, seed=d)
    want = fire_residual_ref(h, s, p)
    out = nan_like(h)
    assert fused.fire_residual(h, s, p, out=out) is out
    np.testing.assert_allclose(out, want, rtol=0, atol=FUSED_ATOL)
    assert fused.fire_residual(h, s, p, out=h) is h  # h += ... in place
    np.testing.assert_allclose(h, want, rtol=0, atol=FUSED_ATOL)


@pytest.mark.parametrize(("batch", "d"), OUT_SHAPES)
@pytest.mark.parametrize("dim", [1, 7, None])
def test_wrapper_project_out(path, batch, d, dim):
    q, *rest = project_args(batch, d, seed=batch)
    dim = d if dim is None else dim
    want = project_normalize_ref(q, *rest, dim)
    out = np.full((batch, dim), np.nan, np.float32)
    assert fused.project_normalize(q, *rest, dim, out=out) is out
    np.testing.assert_allclose(out, want, rtol=0, atol=FUSED_ATOL)
    if dim == d:
        assert fused.project_normalize(q, *rest, dim, out=q) is q
        np.testing.assert_allclose(q, want, rtol=0, atol=FUSED_ATOL)


def test_wrappers_copy_inputs_that_are_not_c_contiguous_float32(path):
    """Strided views and other dtypes are accepted (copied) and leave the caller's arrays alone."""
    a = epilogue_args(3, 13, seed=5)
    odd = (np.asfortranarray(a[0]), a[1].astype(np.float64), a[2], a[3], np.asfortranarray(a[4]), *a[5:])
    before = [x.copy() for x in odd]
    for g, w in zip(fused.fusion_epilogue(*odd), fusion_epilogue_ref(*a)):
        np.testing.assert_allclose(g, w, rtol=0, atol=FUSED_ATOL)
    for x, y in zip(odd, before):
        np.testing.assert_array_equal(x, y)
    q, *rest = project_args(1, 13, seed=1)
    wide = np.zeros((1, 26), np.float32)
    wide[:, ::2] = q  # q as a strided view
    np.testing.assert_allclose(fused.project_normalize(wide[:, ::2], *rest, 7, out=np.empty((1, 7), np.float32)),
                               project_normalize_ref(q, *rest, 7), rtol=0, atol=FUSED_ATOL)
    rng = np.random.default_rng(2)
    h, s, p = rand(rng, 4, 13), rand(rng, 4, 5), fire_params(13, 5, 3)
    np.testing.assert_allclose(fused.fire_residual(h.astype(np.float64), np.asfortranarray(s), p),
                               fire_residual_ref(h, s, p), rtol=0, atol=FUSED_ATOL)
