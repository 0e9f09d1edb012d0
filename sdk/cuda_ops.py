"""CUDA kernels of the embedder head's fused ops, through ctypes: NumPy in, NumPy out.

`sdk/_cuda_ops.so` is built by `scripts/build_cuda.sh` where nvcc exists (C ABI: csrc/cuda/fused.h).
It holds the ops of `sdk.fused` and `sdk.ops.l2_normalize` as GPU kernels, float32 and float16
(activations in binary16, arithmetic in float32). `load()` returns a `CudaOps` when the library
loads and sees a CUDA device, else None, and `reason()` then says why; nothing here raises for a
missing GPU, and nothing imports torch.

The methods use the library's host-pointer entry points: each call allocates device buffers,
copies the inputs in, runs and copies the results back. That suits tests and callers without a
device-array library; code that keeps its tensors on the GPU calls the stream entry points of the
C ABI with its own device pointers instead. Results agree with the NumPy references
(`sdk.fused.*_ref`, `sdk.ops.l2_normalize_ref`) to `FUSED_ATOL` in float32; float16 results
additionally carry their rounding to binary16 (`FUSED_F16_RTOL`).

Experimental: nothing in the runtime calls these kernels yet. The split engine's head runs on the
CPU (`sdk.head` over `sdk._C`), and on a GPU server its ONNX graphs run on onnxruntime's CUDA
provider; the kernels wait for a GPU head (the TensorRT work), tested here against the references
so that they are right when it comes. `fire_residual` is in the same position: FIRE runs inside the
ONNX image graph, and its fused op is kept for a runtime that runs the image tokens' tail itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sdk.errors import InvalidInputError, SdkError
from sdk.fused import FireParams
from sdk.ops import check_dim

__all__ = ["ABI_VERSION", "FUSED_F16_RTOL", "LIBRARY", "CudaOps", "CudaOpsError", "cuda_device_count", "load",
           "reason"]

LIBRARY = Path(__file__).with_name("_cuda_ops.so")  # MOON3_CUDA_OPS=<path> loads another build
ABI_VERSION = 1  # MOON3_CUDA_ABI_VERSION of csrc/cuda/fused.h
# Relative error of a float16 result beyond FUSED_ATOL: its rounding to binary16 (2^-11 ~ 4.9e-4).
FUSED_F16_RTOL = 1e-3

_F32 = np.float32
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES: dict[str, list[Any]] = {
    "fusion_epilogue": [_P] * 8 + [_I] * 3 + [_P] * 3,
    "fire_residual": [_P, _P, _I, _I, _I, _I] + [_P] * 5 + [_F] + [_P] * 6 + [_F, _P],
    "project_normalize": [_P] * 5 + [_I] * 4 + [_P],
    "l2_normalize": [_P, _I, _I, _I, _P],
}
_last_reason = "load() was not called"


class CudaOpsError(SdkError, RuntimeError):
    """A CUDA call of the fused ops failed; `code` is the cudaError_t value."""

    def __init__(self, op: str, code: int, message: str):
        super().__init__(f"CUDA {op} failed: {message} (cudaError {code})")
        self.code = code


def reason() -> str:
    """Why the last `load()` returned None ("" when it returned the library)."""
    return _last_reason


def cuda_device_count() -> tuple[int, str]:
    """CUDA devices visible to the CUDA runtime (libcudart, found by ctypes), without the kernels.

    Returns:
        (count, "") or (0, why there is none: no libcudart, no driver, no device).
    """
    names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12",
             "libcudart.so.11.0"]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    names += [str(p) for p in sorted(Path(home, "lib64").glob("libcudart.so*"))]
    for name in filter(None, names):
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        err = cudart.cudaGetDeviceCount(ctypes.byref(count))
        if err != 0:
            cudart.cudaGetErrorString.restype = ctypes.c_char_p
            return 0, f"cudaGetDeviceCount failed: {cudart.cudaGetErrorString(err).decode()} (cudaError {err})"
        return count.value, "" if count.value else "cudaGetDeviceCount found no CUDA device"
    return 0, "libcudart (the CUDA runtime) was not found"


def load(path: str | os.PathLike[str] | None = None) -> "CudaOps | None":
    """Load the CUDA kernels if this machine can run them.

    Args:
        path: the library; default $MOON3_CUDA_OPS, else `sdk/_cuda_ops.so`.

    Returns:
        A `CudaOps`, or None when the library is missing, cannot be loaded, has another ABI
        version, or sees no CUDA device; `reason()` says which.
    """
    global _last_reason
    lib_path = Path(path if path is not None else os.environ.get("MOON3_CUDA_OPS") or LIBRARY)
    if not lib_path.is_file():
        _last_reason = f"{lib_path} does not exist; build it with scripts/build_cuda.sh (needs nvcc)"
        return None
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as exc:
        _last_reason = f"{lib_path} could not be loaded: {exc}"
        return None
    try:
        lib.moon3_cuda_error_string.restype = ctypes.c_char_p
        lib.moon3_cuda_error_string.argtypes = [ctypes.c_int]
        abi = lib.moon3_cuda_abi_version()
    except AttributeError:
        _last_reason = f"{lib_path} is not a moon3 CUDA ops library (no moon3_cuda_* functions)"
        return None
    if abi != ABI_VERSION:
        _last_reason = f"{lib_path} has C ABI version {abi}, this sdk needs {ABI_VERSION}; rebuild it"
        return None
    count = ctypes.c_int(0)
    err = lib.moon3_cuda_device_count(ctypes.byref(count))
    if err != 0:
        _last_reason = f"no usable CUDA device: {lib.moon3_cuda_error_string(err).decode()} (cudaError {err})"
        return None
    if count.value == 0:
        _last_reason = "no CUDA device"
        return None
    _last_reason = ""
    return CudaOps(lib, lib_path, count.value)


def _shape(shape: tuple[int, ...]) -> str:
    return f"({shape[0]},)" if len(shape) == 1 else "(" + ", ".join(map(str, shape)) + ")"  # as numpy prints


def _expect(a: np.ndarray, name: str, shape: tuple[int, ...]) -> None:
    if a.shape != shape:
        raise InvalidInputError(f"{name} must have shape {_shape(shape)}, got {_shape(a.shape)}")


def _ndim(a: np.ndarray, name: str, ndim: int, what: str) -> None:
    if a.ndim != ndim:
        raise InvalidInputError(f"{name} must be {what}, got shape {_shape(a.shape)}")


def _weights(*arrays: npt.ArrayLike) -> list[np.ndarray]:
    return [np.ascontiguousarray(a, _F32) for a in arrays]


class CudaOps:
    """The loaded kernels (from `load()`); methods mirror `sdk.fused` / `sdk.ops`.

    Activations (q, outs, h, shallow, x) of dtype float16 run the float16 kernels and give
    float16 results; any other dtype is converted to float32. Weights are always float32.

    Raises (every method):
        InvalidInputError: an array has the wrong number of dimensions or a shape that does not
            match the others, or dim is out of range.
        CudaOpsError: a CUDA call failed (out of memory, a driver error).
    """

    def __init__(self, lib: ctypes.CDLL, path: Path, device_count: int):
        self.path = path
        self.device_count = device_count
        self._lib = lib
        self._fn = {}
        for op, argtypes in _SIGNATURES.items():
            for suffix in ("", "_f16"):
                fn = getattr(lib, f"moon3_cuda_{op}{suffix}_host")
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
                self._fn[op + suffix] = fn

    def __repr__(self) -> str:
        return f"CudaOps({str(self.path)!r}, device_count={self.device_count})"

    def _run(self, op: str, half: bool, *args: Any) -> None:
        conv = [a.ctypes.data if isinstance(a, np.ndarray) else a for a in args]
        err = self._fn[op + ("_f16" if half else "")](*conv)
        if err != 0:
            raise CudaOpsError(op, err, self._lib.moon3_cuda_error_string(err).decode())

    @staticmethod
    def _act(x: npt.ArrayLike, half: bool | None = None) -> np.ndarray:
        a = np.asarray(x)
        if half is None:
            half = a.dtype == np.float16
        return np.ascontiguousarray(a, np.float16 if half else _F32)

    def fusion_epilogue(self, q, outs, logits, present, out_w, out_b, ln_w, ln_b):
        """`sdk.fused.fusion_epilogue` on the GPU: (q_new (B, d), LayerNorm(q_new) (B, d), gate (B, M))."""
        q = self._act(q)
        half = q.dtype == np.float16
        outs = self._act(outs, half)
        logits, present, out_w, out_b, ln_w, ln_b = _weights(logits, present, out_w, out_b, ln_w, ln_b)
        _ndim(q, "q", 2, "(B, d)")
        _ndim(outs, "outs", 3, "(B, M, d)")
        (B, d), M = q.shape, outs.shape[1]
        _expect(outs, "outs", (B, M, d))
        _expect(logits, "logits", (B, M))
        _expect(present, "present", (B, M))
        _expect(out_w, "out_w", (d, d))
        for a, name in ((out_b, "out_b"), (ln_w, "ln_w"), (ln_b, "ln_b")):
            _expect(a, name, (d,))
        q_new, h, gate = np.empty_like(q), np.empty_like(q), np.empty((B, M), _F32)
        self._run("fusion_epilogue", half, q, outs, logits, present, out_w, out_b, ln_w, ln_b, B, M, d, q_new, h,
                  gate)
        return q_new, h, gate

    def fire_residual(self, h, shallow, p: FireParams) -> np.ndarray:
        """`sdk.fused.fire_residual` on the GPU: h (..., N, d), shallow (..., N, Cs) -> (..., N, d)."""
        h = self._act(h)
        half = h.dtype == np.float16
        shallow = self._act(shallow, half)
        if h.ndim < 1 or shallow.ndim != h.ndim or shallow.shape[:-1] != h.shape[:-1]:
            raise InvalidInputError(f"h (..., d) and shallow (..., Cs) must have the same leading shape, got "
                                    f"{_shape(h.shape)} and {_shape(shallow.shape)}")
        lead, d, Cs = h.shape[:-1], h.shape[-1], shallow.shape[-1]
        R = int(np.prod(lead))
        w = _weights(p.norm_w, p.norm_b, p.gate_in_w, p.gate_in_b, p.gate_out_w, p.mlp_norm_w, p.mlp_norm_b,
                     p.mlp_in_w, p.mlp_in_b, p.mlp_out_w, p.mlp_out_b)
        _ndim(w[2], "gate_in_w", 2, "(H, d)")
        H = w[2].shape[0]
        shapes = [(d,), (d,), (H, d), (H,), (H,), (Cs,), (Cs,), (H, Cs), (H,), (d, H), (d,)]
        names = ["norm_w", "norm_b", "gate_in_w", "gate_in_b", "gate_out_w", "mlp_norm_w", "mlp_norm_b",
                 "mlp_in_w", "mlp_in_b", "mlp_out_w", "mlp_out_b"]
        for a, name, shape in zip(w, names, shapes):
            _expect(a, name, shape)
        out = np.empty_like(h)
        self._run("fire_residual", half, h, shallow, R, d, Cs, H, *w[:5], float(p.gate_out_b), *w[5:],
                  float(p.scale), out)
        return out

    def project_normalize(self, q, ln_w, ln_b, w, b, dim: int) -> np.ndarray:
        """`sdk.fused.project_normalize` on the GPU: q (B, d) -> (B, dim) rows of unit norm."""
        q = self._act(q)
        ln_w, ln_b, w, b = _weights(ln_w, ln_b, w, b)
        _ndim(q, "q", 2, "(B, d)")
        _ndim(w, "w", 2, "(D, d)")
        (B, d), D = q.shape, w.shape[0]
        _expect(ln_w, "ln_w", (d,))
        _expect(ln_b, "ln_b", (d,))
        _expect(w, "w", (D, d))
        _expect(b, "b", (D,))
        dim = check_dim(dim, D, "the projection's output width")
        out = np.empty((B, dim), q.dtype)
        self._run("project_normalize", q.dtype == np.float16, q, ln_w, ln_b, w, b, B, d, D, dim, out)
        return out

    def l2_normalize(self, x, dim: int | None = None) -> np.ndarray:
        """`sdk.ops.l2_normalize` on the GPU: x (D,) or (B, D) -> (dim,) or (B, dim)."""
        x = self._act(x)
        if x.ndim not in (1, 2):
            raise InvalidInputError(f"x must be (D,) or (B, D), got shape {_shape(x.shape)}")
        x2 = x.reshape(-1, x.shape[-1])  # (B, D)
        dim = check_dim(dim, x2.shape[1])
        out = np.empty((x2.shape[0], dim), x.dtype)
        self._run("l2_normalize", x.dtype == np.float16, x2, x2.shape[0], x2.shape[1], dim, out)
        return out if x.ndim == 2 else out[0]
