"""The head's fused ops: sdk._C (both kernels) and sdk.fused against their NumPy references."""

import dataclasses
import math

import numpy as np
import pytest

from fused_cases import epilogue_args, fire_params, rand

from sdk import fused, ops
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


def fire_c(C, h, s, p, force_scalar):
    return C.fire_residual(h, s, p.norm_w, p.norm_b, p.gate_in_w, p.gate_in_b, p.gate_out_w, p.gate_out_b,
                           p.mlp_norm_w, p.mlp_norm_b, p.mlp_in_w, p.mlp_in_b, p.mlp_out_w, p.mlp_out_b, p.scale,
                           force_scalar=force_scalar)


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
        (lambda C, a: C.fusion_epilogue(a[0][:, :-1], *a[1:]), "outs must have shape"),
        (lambda C, a: C.fusion_epilogue(a[0], a[1], a[2][:, :2], *a[3:]), "logits must have shape"),
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
