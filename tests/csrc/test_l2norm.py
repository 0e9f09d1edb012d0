"""L2 normalisation + Matryoshka truncation: sdk._C (both kernels) and sdk.ops against the reference."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sdk
from sdk import ops
from sdk.errors import InvalidInputError
from sdk.ops import L2_NORMALIZE_ATOL, l2_normalize_ref

BATCHES = (1, 3, 33, 257)
WIDTHS = (64, 129, 250, 256, 384)
DIMS = (7, 64, 128, None)  # None: the full width
CASES = [(b, w, d) for b in BATCHES for w in WIDTHS for d in DIMS if d is None or d <= w]
KERNELS = pytest.mark.parametrize("force_scalar", [False, True], ids=["dispatched", "scalar"])


@pytest.fixture(scope="module")
def C():
    return pytest.importorskip("sdk._C")


def embeddings(batch: int, width: int, seed: int = 0) -> np.ndarray:
    """(B, D) float32 rows with norms spread over ~0.1..100, like unnormalised model outputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, width), dtype=np.float32)
    return x * rng.uniform(0.01, 5.0, size=(batch, 1)).astype(np.float32)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=L2_NORMALIZE_ATOL)


# --- sdk._C ---------------------------------------------------------------------------------


@KERNELS
@pytest.mark.parametrize(("batch", "width", "dim"), CASES)
def test_matches_reference(C, batch, width, dim, force_scalar):
    x = embeddings(batch, width, seed=batch * 1000 + width)
    k = width if dim is None else dim
    x_before = x.copy()
    y = C.l2_normalize(x, k, force_scalar=force_scalar)
    assert_close(y, l2_normalize_ref(x, k))
    np.testing.assert_array_equal(x, x_before)  # input untouched
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


@KERNELS
def test_every_tail_length(C, force_scalar):
    # dims 1..80 cross the 32-wide, 8-wide and scalar-tail boundaries of the AVX2 kernel.
    x = embeddings(5, 80, seed=1)
    for dim in range(1, 81):
        assert_close(C.l2_normalize(x, dim, force_scalar=force_scalar), l2_normalize_ref(x, dim))


def test_dispatch_follows_cpu_features(C):
    features = C.cpu_features()
    assert set(features) == {"avx2", "fma"}
    assert all(isinstance(v, bool) for v in features.values())
    expected = "avx2" if features["avx2"] and features["fma"] else "scalar"
    assert C.l2_normalize_kernel() == expected


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not Path("/proc/cpuinfo").exists(),
    reason="needs an x86-64 Linux /proc/cpuinfo",
)
def test_cpu_features_agree_with_proc_cpuinfo(C):
    flags_line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    flags = set(flags_line.split(":", 1)[1].split())
    assert C.cpu_features() == {"avx2": "avx2" in flags, "fma": "fma" in flags}


@KERNELS
def test_out_buffer_is_written_and_returned(C, force_scalar):
    x = embeddings(33, 256, seed=2)
    out = np.full((33, 128), np.nan, dtype=np.float32)
    y = C.l2_normalize(x, 128, out, force_scalar=force_scalar)
    assert y is out
    assert_close(out, l2_normalize_ref(x, 128))


@KERNELS
@pytest.mark.parametrize("dim", [7, 128, 250])
def test_in_place(C, force_scalar, dim):
    x = embeddings(33, 250, seed=3)
    expected = l2_normalize_ref(x, dim)
    # out starts at x's first element; with dim < D the rows are packed into x's leading bytes.
    out = x.reshape(-1)[: 33 * dim].reshape(33, dim)
    assert C.l2_normalize(x, dim, out, force_scalar=force_scalar) is out
    assert_close(out, expected)


@KERNELS
def test_zero_and_tiny_rows_follow_eps(C, force_scalar):
    x = embeddings(4, 129, seed=4)
    x[1] = 0.0
    x[3] = 1e-30  # the squares underflow to 0, so the row is divided by eps, as in torch
    y = C.l2_normalize(x, 129, force_scalar=force_scalar)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[1], 0.0)
    assert_close(y, l2_normalize_ref(x))


def test_empty_batch(C):
    y = C.l2_normalize(np.empty((0, 64), np.float32), 32)
    assert y.shape == (0, 32) and y.dtype == np.float32


def test_version_matches_package(C):
    assert C.__version__ == sdk.__version__


def _unaligned(shape):
    buf = np.zeros(int(np.prod(shape)) * 4 + 1, dtype=np.uint8)
    a = np.frombuffer(buf.data, dtype=np.float32, count=int(np.prod(shape)), offset=1).reshape(shape)
    assert not a.flags.aligned
    return a


def _read_only(shape):
    a = np.zeros(shape, np.float32)
    a.flags.writeable = False
    return a


X = embeddings(3, 16)
BAD_CALLS = {
    "x-list": (lambda: (X.tolist(), 8, None), TypeError, "x must be a numpy.ndarray"),
    "x-float64": (lambda: (X.astype(np.float64), 8, None), TypeError, "x must have dtype float32"),
    "x-big-endian": (lambda: (X.astype(">f4"), 8, None), TypeError, "x must have dtype float32"),
    "x-1d": (lambda: (X[0], 8, None), ValueError, r"x must be 2-D \(B, D\), got shape \(16,\)"),
    "x-3d": (lambda: (X[None], 8, None), ValueError, "x must be 2-D"),
    "x-fortran": (lambda: (np.asfortranarray(X), 8, None), ValueError, "x must be C-contiguous"),
    "x-strided": (lambda: (X[:, ::2], 8, None), ValueError, "x must be C-contiguous"),
    "x-unaligned": (lambda: (_unaligned((3, 16)), 8, None), ValueError, "x must be aligned"),
    "dim-0": (lambda: (X, 0, None), ValueError, r"dim must be in \[1, D\] = \[1, 16\], got 0"),
    "dim-negative": (lambda: (X, -3, None), ValueError, "dim must be in"),
    "dim-too-big": (lambda: (X, 17, None), ValueError, "got 17"),
    "out-shape": (lambda: (X, 8, np.empty((3, 16), np.float32)), ValueError, r"out must have shape \(3, 8\)"),
    "out-float64": (lambda: (X, 8, np.empty((3, 8))), TypeError, "out must have dtype float32"),
    "out-strided": (lambda: (X, 8, np.empty((3, 16), np.float32)[:, ::2]), ValueError, "C-contiguous"),
    "out-read-only": (lambda: (X, 8, _read_only((3, 8))), ValueError, "out is read-only"),
    "out-overlaps": (lambda: (X, 8, X.reshape(-1)[1:25].reshape(3, 8)), ValueError, "out overlaps x"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises(C, case):
    make_args, exc, match = BAD_CALLS[case]
    x, dim, out = make_args()
    with pytest.raises(exc, match=match):
        C.l2_normalize(x, dim, out)


# --- sdk.ops (runs without sdk._C too) -----------------------------------------------------


@pytest.fixture(params=["compiled", "reference"])
def backend(request, monkeypatch):
    if request.param == "compiled":
        if not ops.HAVE_C:
            pytest.skip("sdk._C is not built or MOON3_DISABLE_C=1")
    else:
        monkeypatch.setattr(ops, "HAVE_C", False)
        # The reference path must not touch the compiled module at all.
        monkeypatch.setattr(ops, "_C", None)
    return request.param


@pytest.mark.parametrize("dim", [7, 128, None])
def test_public_op_matches_reference(backend, dim):
    x = embeddings(33, 256, seed=5)
    assert_close(ops.l2_normalize(x, dim), l2_normalize_ref(x, dim))


def test_public_op_uses_compiled_kernel_when_available(monkeypatch):
    calls = []

    class Spy:
        @staticmethod
        def l2_normalize(x, dim, out):
            calls.append((x.shape, dim))
            return l2_normalize_ref(x, dim)

    monkeypatch.setattr(ops, "HAVE_C", True)
    monkeypatch.setattr(ops, "_C", Spy)
    ops.l2_normalize(embeddings(3, 64), 32)
    assert calls == [((3, 64), 32)]


def test_public_op_1d_and_conversions(backend):
    x = embeddings(4, 129, seed=6)
    y1 = ops.l2_normalize(x[2], 64)
    assert y1.shape == (64,)
    assert_close(y1, l2_normalize_ref(x[2], 64))
    # float64, int and list inputs are converted to float32.
    assert_close(ops.l2_normalize(x.astype(np.float64), 64), l2_normalize_ref(x, 64))
    assert_close(ops.l2_normalize(x.tolist(), 64), l2_normalize_ref(x, 64))
    ints = np.arange(-8, 8, dtype=np.int64).reshape(2, 8)
    assert_close(ops.l2_normalize(ints), l2_normalize_ref(ints.astype(np.float32)))
    # Strided float32 input is copied, not rejected.
    assert_close(ops.l2_normalize(x[:, ::2], 7), l2_normalize_ref(np.ascontiguousarray(x[:, ::2]), 7))


def test_public_op_zero_row(backend):
    x = embeddings(3, 64, seed=7)
    x[0] = 0.0
    y = ops.l2_normalize(x)
    np.testing.assert_array_equal(y[0], 0.0)
    assert np.isfinite(y).all()


def test_public_op_out(backend):
    x = embeddings(3, 64, seed=8)
    out = np.empty((3, 32), np.float32)
    assert ops.l2_normalize(x, 32, out=out) is out
    assert_close(out, l2_normalize_ref(x, 32))
    out1 = np.empty(32, np.float32)
    assert ops.l2_normalize(x[1], 32, out=out1) is out1
    assert_close(out1, l2_normalize_ref(x[1], 32))
    expected = l2_normalize_ref(x)
    assert ops.l2_normalize(x, out=x) is x  # in place
    assert_close(x, expected)


def test_public_op_ignores_nan_in_truncated_columns(backend):
    x = embeddings(2, 64, seed=9)
    x[:, 40:] = np.nan
    assert_close(ops.l2_normalize(x, 32), l2_normalize_ref(x, 32))


F = embeddings(3, 16)
PUBLIC_BAD_CALLS = {
    "nan": (lambda: (np.where(np.arange(16) == 3, np.nan, F), None, None), "NaN or infinite values in 3 row"),
    "inf-1d": (lambda: (np.append(F[0, :15], np.float32(np.inf)), None, None), "NaN or infinite values;"),
    "float64-overflow": (lambda: (F.astype(np.float64) * 1e300, None, None), "after conversion to float32"),
    "scalar": (lambda: (np.float32(1.0), None, None), r"must be \(D,\) or \(B, D\), got shape \(\)"),
    "3d": (lambda: (F[None], None, None), r"got shape \(1, 3, 16\); reshape"),
    "no-columns": (lambda: (np.empty((3, 0), np.float32), None, None), "no components"),
    "strings": (lambda: (np.array([["a", "b"]]), None, None), "must hold real numbers"),
    "complex": (lambda: (F.astype(np.complex64), None, None), "must hold real numbers"),
    "ragged": (lambda: ([[1.0, 2.0], [3.0]], None, None), "could not be read as an array"),
    "dim-0": (lambda: (F, 0, None), r"dim must be in \[1, 16\] \(the embedding width\), got 0"),
    "dim-too-big": (lambda: (F, 17, None), "got 17"),
    "dim-float": (lambda: (F, 8.0, None), "dim must be an int"),
    "dim-bool": (lambda: (F, True, None), "dim must be an int"),
    "out-list": (lambda: (F, 8, [0.0] * 24), "out must be a numpy.ndarray"),
    "out-dtype": (lambda: (F, 8, np.empty((3, 8))), "out must have dtype float32"),
    "out-shape": (lambda: (F, 8, np.empty((3, 16), np.float32)), r"out must have shape \(3, 8\)"),
    "out-shape-1d": (lambda: (F[0], 8, np.empty((1, 8), np.float32)), r"out must have shape \(8,\)"),
    "out-strided": (lambda: (F, 8, np.empty((3, 16), np.float32)[:, ::2]), "C-contiguous"),
    "out-read-only": (lambda: (F, 8, _read_only((3, 8))), "out is read-only"),
    "out-overlaps": (lambda: (F, 8, F.reshape(-1)[1:25].reshape(3, 8)), "out overlaps x"),
}


@pytest.mark.parametrize("case", list(PUBLIC_BAD_CALLS))
def test_public_op_bad_input_raises(backend, case):
    make_args, match = PUBLIC_BAD_CALLS[case]
    x, dim, out = make_args()
    with pytest.raises(InvalidInputError, match=match) as info:
        ops.l2_normalize(x, dim, out=out)
    assert isinstance(info.value, ValueError)


def _python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_env_var_disables_compiled_module():
    code = (
        "import numpy as np, sdk.ops as o; x = np.arange(12, dtype=np.float32).reshape(3, 4);"
        "assert np.allclose(o.l2_normalize(x, 3), o.l2_normalize_ref(x, 3)); print(o.HAVE_C)"
    )
    assert _python(code, MOON3_DISABLE_C="1") == "False"


def test_ops_does_not_import_torch():
    assert _python("import sys, sdk.ops; print('torch' in sys.modules)") == "False"
