"""CUDA kernels of the head's fused ops (csrc/cuda/fused.cu via sdk.cuda_ops) against the NumPy references.

Three layers, so that each runs where it can:
- the compile check (nvcc, warnings as errors, one architecture) and the C ABI's argument checks,
  which never reach a GPU, run wherever nvcc is, CI included;
- the ctypes wrappers' argument order and shape checks run everywhere, against a stand-in
  library that reads the buffers the way fused.h lays them out and fills the results from the
  references;
- correctness: every op against its reference over shapes, float32 and float16, on a GPU (marked
  `gpu`; skipped with the reason when libcudart sees no CUDA device), and on a few small shapes
  everywhere, with fused.cu compiled by the host compiler against a CPU emulation of the CUDA
  runtime (tests/csrc/cuda_emu).
"""

import ctypes
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fused_cases import epilogue_args, fire_params, rand

from sdk import cuda_ops
from sdk.cuda_ops import FUSED_F16_RTOL, CudaOps, CudaOpsError
from sdk.errors import InvalidInputError
from sdk.fused import FUSED_ATOL, FireParams, fire_residual_ref, fusion_epilogue_ref, project_normalize_ref
from sdk.ops import l2_normalize_ref

ROOT = Path(__file__).resolve().parents[2]
NVCC = os.environ.get("NVCC") or shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")
# A wheel's test run (cibuildwheel copies only tests/csrc) has no csrc/ or scripts/ to build from.
HAVE_SOURCES = (ROOT / "csrc/cuda/fused.cu").is_file() and (ROOT / "scripts/build_cuda.sh").is_file()
needs_sources = pytest.mark.skipif(not HAVE_SOURCES, reason="needs a source checkout (csrc/cuda, scripts/)")
INVALID_VALUE = 1  # cudaErrorInvalidValue
OPS = ("fusion_epilogue", "fire_residual", "project_normalize", "l2_normalize")
ABI = ["moon3_cuda_abi_version", "moon3_cuda_device_count", "moon3_cuda_error_string"] + [
    f"moon3_cuda_{op}{half}{host}" for op in OPS for half in ("", "_f16") for host in ("", "_host")
]


def build(out: Path, arch: str, strict: bool = True) -> Path:
    """scripts/build_cuda.sh for one architecture; strict: every warning an error."""
    env = {**os.environ, "MOON3_NVCC_FLAGS": "-Werror all-warnings -Xcompiler -Werror" if strict else ""}
    if NVCC:
        env["NVCC"] = NVCC
    result = subprocess.run(["bash", str(ROOT / "scripts/build_cuda.sh"), "--arch", arch, "--out", str(out)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
    return out


def projection_args(B, d, D, seed=0):
    rng = np.random.default_rng(seed)
    return (rand(rng, B, d), 1 + rand(rng, d, scale=0.1), rand(rng, d, scale=0.1),
            rand(rng, D, d, scale=1 / math.sqrt(d)), rand(rng, D))


def half(a):
    """a rounded to float16, and that rounded value in float32 (what the references get)."""
    h = np.asarray(a, np.float32).astype(np.float16)
    return h, h.astype(np.float32)


def assert_close(got, want, dtype=np.float32):
    assert got.dtype == dtype and got.shape == want.shape
    rtol = FUSED_F16_RTOL if dtype == np.float16 else 0
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=rtol, atol=FUSED_ATOL)


# --- compile check and C ABI (nvcc, no GPU needed) ----------------------------------------------


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The kernels compiled for sm_80 only (the full build's arch list takes ~5x longer)."""
    if NVCC is None:
        pytest.skip("nvcc not found (CUDA toolkit not installed)")
    if not HAVE_SOURCES:
        pytest.skip("needs a source checkout (csrc/cuda, scripts/)")
    return build(tmp_path_factory.mktemp("cuda") / "_cuda_ops.so", "80")


@pytest.fixture(scope="module")
def lib(library):
    return ctypes.CDLL(str(library))


@needs_nvcc
def test_kernels_compile_without_warnings_and_export_only_the_abi(library, lib):
    for name in ABI:
        assert hasattr(lib, name), name
    assert lib.moon3_cuda_abi_version() == cuda_ops.ABI_VERSION
    nm = shutil.which("nm")
    if nm:  # hidden visibility: nothing of the static CUDA runtime leaks out
        out = subprocess.run([nm, "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
        exported = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
        assert exported == set(ABI)


@needs_nvcc
def test_loader_agrees_with_libcudart(library):
    ops = cuda_ops.load(library)
    count, why = cuda_ops.cuda_device_count()
    if count:
        assert isinstance(ops, CudaOps) and ops.device_count == count and cuda_ops.reason() == ""
    else:
        assert ops is None
        assert "CUDA device" in cuda_ops.reason()


def at(offset=0):
    """A fake device address: only calls rejected before any CUDA work may get one."""
    return ctypes.c_void_p(0x10000 + offset)


def call(lib, fn, *args):
    f = getattr(lib, fn)
    f.restype = ctypes.c_int
    return f(*[ctypes.c_int64(a) if isinstance(a, int) else a for a in args])


@needs_nvcc
@pytest.mark.parametrize(
    ("fn", "args"),
    [
        ("moon3_cuda_l2_normalize_host", (at(), 2, 4, 5, at())),  # dim > D
        ("moon3_cuda_l2_normalize_host", (at(), 2, 4, 0, at())),  # dim < 1
        ("moon3_cuda_l2_normalize_host", (at(), -1, 4, 2, at())),  # B < 0
        ("moon3_cuda_l2_normalize_host", (None, 2, 4, 2, at())),  # null pointer
        ("moon3_cuda_l2_normalize", (at(), 2, 4, 2, at(), None)),  # in place with dim < D
        ("moon3_cuda_l2_normalize", (at(), 2, 4, 4, at(4), None)),  # y overlaps x
        ("moon3_cuda_l2_normalize_f16", (at(), 2, 4, 4, at(14), None)),  # overlap in binary16 elements
        ("moon3_cuda_l2_normalize_f16", (at(), 1, 1 << 31, 4, at(1 << 40), None)),  # D beyond int32
        ("moon3_cuda_project_normalize_host", (at(),) * 5 + (2, 8, 4, 5, at())),  # dim > D
        ("moon3_cuda_fusion_epilogue_host", (at(),) * 8 + (2, 0, 8) + (at(),) * 3),  # M = 0
        ("moon3_cuda_fusion_epilogue", (at(),) * 8 + (2, 3, 8) + (at(), at(), None, None)),  # gate null
        ("moon3_cuda_fire_residual_host", (at(), at(), 3, 8, 4, 0) + (at(),) * 5 + (ctypes.c_float(0),)
         + (at(),) * 6 + (ctypes.c_float(1), at())),  # H = 0
    ],
)
def test_abi_rejects_bad_sizes_and_pointers_before_cuda_work(lib, fn, args):
    assert call(lib, fn, *args) == INVALID_VALUE


@needs_nvcc
def test_abi_empty_batch_is_a_no_op(lib):
    # No rows: nothing to launch, so success even without a GPU (and without touching the pointers).
    assert call(lib, "moon3_cuda_l2_normalize_host", None, 0, 4, 2, None) == 0
    assert call(lib, "moon3_cuda_fusion_epilogue", *(None,) * 8, 0, 3, 8, None, None, None, None) == 0
    lib.moon3_cuda_error_string.restype = ctypes.c_char_p
    assert lib.moon3_cuda_error_string(INVALID_VALUE) == b"invalid argument"


@needs_sources
def test_build_script_without_nvcc():
    script = str(ROOT / "scripts/build_cuda.sh")
    env = {**os.environ, "NVCC": "/nonexistent/nvcc"}
    skipped = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert skipped.returncode == 0 and "nvcc not found" in skipped.stderr
    required = subprocess.run(["bash", script, "--require"], env=env, capture_output=True, text=True)
    assert required.returncode == 1 and "nvcc not found" in required.stderr


def test_loader_without_library(tmp_path):
    assert cuda_ops.load(tmp_path / "missing.so") is None
    assert "build it with scripts/build_cuda.sh" in cuda_ops.reason()
    (tmp_path / "junk.so").write_bytes(b"not a shared object")
    assert cuda_ops.load(tmp_path / "junk.so") is None
    assert "could not be loaded" in cuda_ops.reason()


def test_loader_refuses_another_shared_object():
    other = pytest.importorskip("sdk._C").__file__  # a shared object without the C ABI
    assert cuda_ops.load(other) is None
    assert "is not a moon3 CUDA ops library" in cuda_ops.reason()


def test_cuda_ops_does_not_import_torch():
    code = "import sys, sdk.cuda_ops as c; c.load(); c.cuda_device_count(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the ctypes wrappers, against a stand-in library (no GPU, no nvcc) -------------------------


def _buf(ptr, shape, f16=False):
    """The numpy view of a host buffer the wrapper passed as an address."""
    n = int(np.prod(shape))
    a = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint16 if f16 else ctypes.c_float)), (n,))
    return (a.view(np.float16) if f16 else a).reshape(shape)


def _standin(f16):
    """Host entry points that read their arguments in fused.h's order and answer with the references."""
    act = lambda p, *s: _buf(p, s, f16)  # noqa: E731
    f32 = lambda p, *s: _buf(p, s)  # noqa: E731

    def fusion_epilogue(q, outs, logits, present, out_w, out_b, ln_w, ln_b, B, M, d, q_new, h, gate):
        want = fusion_epilogue_ref(act(q, B, d).astype(np.float32), act(outs, B, M, d).astype(np.float32),
                                   f32(logits, B, M), f32(present, B, M), f32(out_w, d, d), f32(out_b, d),
                                   f32(ln_w, d), f32(ln_b, d))
        act(q_new, B, d)[...], act(h, B, d)[...], f32(gate, B, M)[...] = want
        return 0

    def fire_residual(h, s, R, d, Cs, H, nw, nb, giw, gib, gow, gob, mnw, mnb, miw, mib, mow, mob, scale, out):
        p = FireParams(f32(nw, d), f32(nb, d), f32(giw, H, d), f32(gib, H), f32(gow, H), gob, f32(mnw, Cs),
                       f32(mnb, Cs), f32(miw, H, Cs), f32(mib, H), f32(mow, d, H), f32(mob, d), scale)
        act(out, R, d)[...] = fire_residual_ref(act(h, R, d).astype(np.float32), act(s, R, Cs).astype(np.float32), p)
        return 0

    def project_normalize(q, ln_w, ln_b, w, b, B, d, D, dim, out):
        act(out, B, dim)[...] = project_normalize_ref(act(q, B, d).astype(np.float32), f32(ln_w, d), f32(ln_b, d),
                                                      f32(w, D, d), f32(b, D), dim)
        return 0

    def l2_normalize(x, B, D, dim, y):
        act(y, B, dim)[...] = l2_normalize_ref(act(x, B, D), dim)
        return 0

    return {"fusion_epilogue": fusion_epilogue, "fire_residual": fire_residual,
            "project_normalize": project_normalize, "l2_normalize": l2_normalize}


@pytest.fixture
def standin():
    fns = {}
    for suffix, f16 in (("", False), ("_f16", True)):
        fns |= {f"moon3_cuda_{op}{suffix}_host": fn for op, fn in _standin(f16).items()}
    lib = SimpleNamespace(**fns, moon3_cuda_error_string=lambda code: b"out of memory")
    return CudaOps(lib, Path("standin.so"), 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_wrappers_pass_arguments_in_abi_order(standin, dtype):
    args = epilogue_args(3, 20, M=4)
    q, outs = half(args[0])[1], half(args[1])[1]
    got = standin.fusion_epilogue(q.astype(dtype), outs.astype(dtype), *args[2:])
    for g, w in zip(got, fusion_epilogue_ref(q, outs, *args[2:])):
        assert_close(g, w, dtype if g.shape[1] == 20 else np.float32)

    rng = np.random.default_rng(1)
    h, s, p = half(rand(rng, 2, 5, 12))[1], half(rand(rng, 2, 5, 7))[1], fire_params(12, 7, 9)
    assert_close(standin.fire_residual(h.astype(dtype), s.astype(dtype), p), fire_residual_ref(h, s, p), dtype)

    qq, lw, lb, w, b = projection_args(4, 10, 23)
    qq = half(qq)[1]
    assert_close(standin.project_normalize(qq.astype(dtype), lw, lb, w, b, 9),
                 project_normalize_ref(qq, lw, lb, w, b, 9), dtype)
    x = half(rand(rng, 3, 17))[1]
    assert_close(standin.l2_normalize(x.astype(dtype), 5), l2_normalize_ref(x, 5), dtype)
    assert_close(standin.l2_normalize(x[1].astype(dtype)), l2_normalize_ref(x[1]), dtype)


def test_wrappers_convert_other_dtypes_to_float32(standin):
    x = rand(np.random.default_rng(2), 2, 8)
    got = standin.l2_normalize(x.astype(np.float64).tolist(), 4)
    assert_close(got, l2_normalize_ref(x, 4))


def test_wrapper_raises_cuda_errors(standin):
    standin._fn["l2_normalize"] = lambda *a: 2
    with pytest.raises(CudaOpsError, match=r"CUDA l2_normalize failed: out of memory \(cudaError 2\)") as info:
        standin.l2_normalize(np.ones((2, 4), np.float32))
    assert info.value.code == 2


BAD_CALLS = {
    "q-1d": (lambda o, a: o.fusion_epilogue(a[0][0], *a[1:]), r"q must be \(B, d\), got shape \(16,\)"),
    "outs": (lambda o, a: o.fusion_epilogue(a[0][:, :-1], *a[1:]), r"outs must have shape \(2, 3, 15\)"),
    "logits": (lambda o, a: o.fusion_epilogue(a[0], a[1], a[2][:, :2], *a[3:]), "logits must have shape"),
    "out_w": (lambda o, a: o.fusion_epilogue(*a[:4], a[4][:-1], *a[5:]), r"out_w must have shape \(16, 16\)"),
    "ln_b": (lambda o, a: o.fusion_epilogue(*a[:7], a[7][:3]), r"ln_b must have shape \(16,\), got \(3,\)"),
    "dim-0": (lambda o, a: o.project_normalize(a[0], a[6], a[7], a[4], a[5], 0), r"dim must be in \[1, 16\]"),
    "proj-b": (lambda o, a: o.project_normalize(a[0], a[6], a[7], a[4], a[5][:-1], 4), "b must have shape"),
    "l2-3d": (lambda o, a: o.l2_normalize(a[1]), r"x must be \(D,\) or \(B, D\)"),
    "l2-dim": (lambda o, a: o.l2_normalize(a[0], 17), r"dim must be in \[1, 16\]"),
    "fire-lead": (lambda o, a: o.fire_residual(a[0], a[0][:1, :8], fire_params(16, 8, 4)), "same leading shape"),
    "fire-w": (lambda o, a: o.fire_residual(a[0], a[0][:, :8], fire_params(16, 9, 4)), "mlp_norm_w must have shape"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_wrappers_reject_bad_shapes(standin, case):
    call, match = BAD_CALLS[case]
    with pytest.raises(InvalidInputError, match=match):
        call(standin, epilogue_args(2, 16))


# --- correctness: every op against its reference -----------------------------------------------


def check_fusion_epilogue(ops, batch, d, M):
    args = epilogue_args(batch, d, M=M, seed=batch + d + M)
    for g, w in zip(ops.fusion_epilogue(*args), fusion_epilogue_ref(*args)):
        assert_close(g, w)


def check_absent_modalities_are_never_read(ops):
    q, outs, logits, present, *rest = epilogue_args(4, 40)
    present[:] = [1, 0, 1]
    want = ops.fusion_epilogue(q, outs, logits, present, *rest)
    outs[:, 1] = np.nan
    got = ops.fusion_epilogue(q, outs, logits, present, *rest)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert np.all(got[2][:, 1] == 0.0)


def check_fire_residual(ops, rows, d, Cs, H, lead=()):
    rng = np.random.default_rng(rows)
    h, s, p = rand(rng, *lead, rows, d), rand(rng, *lead, rows, Cs), fire_params(d, Cs, H, seed=d)
    assert_close(ops.fire_residual(h, s, p), fire_residual_ref(h, s, p))


def check_project_normalize(ops, batch, d, dim):
    D = 2 * d + 3
    dim = D if dim is None else min(dim, D)
    args = projection_args(batch, d, D, seed=batch * d)
    got = ops.project_normalize(*args, dim)
    assert_close(got, project_normalize_ref(*args, dim))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def check_project_normalize_beyond_48k_of_shared_memory(ops):
    args = projection_args(2, 13000, 64)  # (8 + 13000 + 64) floats a row: the kernel opts in to more
    assert_close(ops.project_normalize(*args, 64), project_normalize_ref(*args, 64))


def check_rows_beyond_the_shared_memory_raise(ops):
    args = projection_args(1, 80000, 4)  # 320 KB of shared memory a row: more than any GPU has
    with pytest.raises(CudaOpsError, match="cudaError 1"):
        ops.project_normalize(*args, 4)


def check_l2_normalize(ops, batch, D, dim):
    dim = None if dim is None or dim > D else dim
    x = rand(np.random.default_rng(batch + D), batch, D, scale=3.0)
    x[0, :] = 0.0  # a zero row stays zero
    got = ops.l2_normalize(x, dim)
    assert_close(got, l2_normalize_ref(x, dim))
    np.testing.assert_array_equal(got[0], 0.0)


def check_empty_batch(ops):
    assert ops.l2_normalize(np.empty((0, 8), np.float32), 4).shape == (0, 4)
    assert [a.shape for a in ops.fusion_epilogue(*epilogue_args(0, 16))] == [(0, 16), (0, 16), (0, 3)]


def check_float16(ops, tokens=49):
    args = epilogue_args(5, 72, seed=4)
    (q16, q), (o16, outs) = half(args[0]), half(args[1])
    got = ops.fusion_epilogue(q16, o16, *args[2:])
    want = fusion_epilogue_ref(q, outs, *args[2:])
    assert_close(got[0], want[0], np.float16)
    assert_close(got[1], want[1], np.float16)
    assert_close(got[2], want[2])  # the gate stays float32

    rng = np.random.default_rng(5)
    (h16, h), (s16, s) = half(rand(rng, tokens, 40)), half(rand(rng, tokens, 24))
    p = fire_params(40, 24, 32)
    assert_close(ops.fire_residual(h16, s16, p), fire_residual_ref(h, s, p), np.float16)

    qq, lw, lb, w, b = projection_args(6, 44, 90)
    q16, qq = half(qq)
    assert_close(ops.project_normalize(q16, lw, lb, w, b, 33), project_normalize_ref(qq, lw, lb, w, b, 33),
                 np.float16)
    x16, x = half(rand(rng, 7, 130))
    assert_close(ops.l2_normalize(x16, 100), l2_normalize_ref(x, 100), np.float16)


# --- ... on a GPU ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    """The kernels on this machine's GPU: built fresh for it (`--arch native`) when nvcc is here,
    else the installed sdk/_cuda_ops.so (or $MOON3_CUDA_OPS)."""
    count, why = cuda_ops.cuda_device_count()
    if count == 0:
        pytest.skip(f"needs a CUDA device: {why}")
    path = None
    if NVCC and HAVE_SOURCES and not os.environ.get("MOON3_CUDA_OPS"):
        # not strict: an older GPU may draw a deprecation warning; the compile check is strict
        path = build(tmp_path_factory.mktemp("cuda") / "_cuda_ops.so", "native", strict=False)
    ops = cuda_ops.load(path)
    if ops is None:
        if NVCC is None and "does not exist" in cuda_ops.reason():
            pytest.skip(f"kernels not built and no nvcc to build them: {cuda_ops.reason()}")
        pytest.fail(f"a CUDA device is present but the kernels did not load: {cuda_ops.reason()}")
    return ops


# (batch, d): batch 1 and larger, widths not multiples of 8 or 32, one wider than a block's threads
SHAPES = [(1, 256), (3, 36), (5, 13), (17, 64), (32, 256), (2, 300)]
FIRE_SHAPES = [(1, 256, 152, 128), (49, 256, 152, 128), (7, 36, 13, 9), (98, 32, 8, 16), (3, 5, 3, 1),
               (5, 20, 70, 33), (4, 300, 260, 40)]


@pytest.mark.gpu
class TestOnGpu:
    @pytest.mark.parametrize(("batch", "d"), SHAPES)
    @pytest.mark.parametrize("M", [1, 3, 5])
    def test_fusion_epilogue(self, gpu, batch, d, M):
        check_fusion_epilogue(gpu, batch, d, M)

    def test_fusion_epilogue_never_reads_absent_modalities(self, gpu):
        check_absent_modalities_are_never_read(gpu)

    @pytest.mark.parametrize(("rows", "d", "Cs", "H"), FIRE_SHAPES)
    def test_fire_residual(self, gpu, rows, d, Cs, H):
        check_fire_residual(gpu, rows, d, Cs, H)

    def test_fire_residual_keeps_leading_axes(self, gpu):
        check_fire_residual(gpu, 49, 24, 8, 16, lead=(2,))

    @pytest.mark.parametrize(("batch", "d"), SHAPES)
    @pytest.mark.parametrize("dim", [1, 7, 64, None])
    def test_project_normalize(self, gpu, batch, d, dim):
        check_project_normalize(gpu, batch, d, dim)

    def test_project_normalize_beyond_48k_of_shared_memory(self, gpu):
        check_project_normalize_beyond_48k_of_shared_memory(gpu)

    def test_rows_beyond_the_shared_memory_raise(self, gpu):
        check_rows_beyond_the_shared_memory_raise(gpu)
        check_l2_normalize(gpu, 3, 64, 7)  # and the next call is not handed that error

    @pytest.mark.parametrize(("batch", "D"), [(1, 64), (3, 129), (33, 256), (5, 1000)])
    @pytest.mark.parametrize("dim", [1, 7, 128, None])
    def test_l2_normalize(self, gpu, batch, D, dim):
        check_l2_normalize(gpu, batch, D, dim)

    def test_empty_batch(self, gpu):
        check_empty_batch(gpu)

    def test_float16(self, gpu):
        check_float16(gpu)


# --- ... on the CPU, through an emulation of the CUDA runtime (tests/csrc/cuda_emu) --------------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """fused.cu compiled by the host C++ compiler against cuda_emu/: the kernels' own source, run on
    the CPU (a block's threads as std::threads), so CI checks their arithmetic without a GPU."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or clang++) to build the emulation")
    if not HAVE_SOURCES:
        pytest.skip("needs a source checkout (csrc/cuda)")
    out = tmp_path_factory.mktemp("cuda_emu") / "fused_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
           "-I", str(ROOT / "tests/csrc/cuda_emu"), "-x", "c++", str(ROOT / "csrc/cuda/fused.cu"), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ops = cuda_ops.load(out)
    assert ops is not None, cuda_ops.reason()
    return ops


# Small shapes (an emulated block costs ~0.1 s), covering what the GPU list covers: batch 1 and
# more, widths off the multiples of 8 and 32 and above the block's 256 threads, 1 and 5 modalities,
# Cs above and below d, Matryoshka dim 1 and full, float16, empty batches, large rows.
EMULATED = {
    "epilogue-1x36-M3": lambda o: check_fusion_epilogue(o, 1, 36, 3),
    "epilogue-3x13-M5": lambda o: check_fusion_epilogue(o, 3, 13, 5),
    "epilogue-2x300-M1": lambda o: check_fusion_epilogue(o, 2, 300, 1),
    "epilogue-absent": check_absent_modalities_are_never_read,
    "fire-3x36x13x9": lambda o: check_fire_residual(o, 3, 36, 13, 9),
    "fire-2x20x70x33": lambda o: check_fire_residual(o, 2, 20, 70, 33),
    "fire-3x5x3x1": lambda o: check_fire_residual(o, 3, 5, 3, 1),
    "fire-1x300x260x40": lambda o: check_fire_residual(o, 1, 300, 260, 40),
    "fire-2x2x16x8x4": lambda o: check_fire_residual(o, 2, 16, 8, 4, lead=(2,)),
    "project-1x36-dim7": lambda o: check_project_normalize(o, 1, 36, 7),
    "project-3x13-full": lambda o: check_project_normalize(o, 3, 13, None),
    "project-2x300-dim1": lambda o: check_project_normalize(o, 2, 300, 1),
    "project-beyond-48k": check_project_normalize_beyond_48k_of_shared_memory,
    "too-big": check_rows_beyond_the_shared_memory_raise,
    "l2-3x129-dim7": lambda o: check_l2_normalize(o, 3, 129, 7),
    "l2-5x1000-full": lambda o: check_l2_normalize(o, 5, 1000, None),
    "empty": check_empty_batch,
    "float16": lambda o: check_float16(o, tokens=3),
}


@pytest.mark.parametrize("case", list(EMULATED))
def test_emulated_kernels_match_references(emulated, case):
    EMULATED[case](emulated)


@needs_sources
def test_ctypes_signatures_are_the_headers():
    """sdk.cuda_ops declares each host entry point's argument types by hand: they must be
    fused.h's, for the float32 and the float16 variant alike (a pointer of any type is a void*)."""
    import re

    header = (ROOT / "csrc/cuda/fused.h").read_text()
    kinds = {"int64_t": ctypes.c_int64, "float": ctypes.c_float}
    for op, argtypes in cuda_ops._SIGNATURES.items():
        for suffix in ("", "_f16"):
            name = f"moon3_cuda_{op}{suffix}_host"
            decl = re.search(rf"\bint {name}\(([^)]*)\);", header)
            assert decl, f"fused.h does not declare {name}"
            params = [" ".join(p.split()) for p in decl.group(1).split(",")]
            want = [ctypes.c_void_p if "*" in p else kinds[p.split()[-2]] for p in params]
            assert argtypes == want, f"{name}: sdk.cuda_ops passes {argtypes}, fused.h declares {params}"
    assert f"#define MOON3_CUDA_ABI_VERSION {cuda_ops.ABI_VERSION}\n" in header
