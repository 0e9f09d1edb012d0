"""Fused embedding ops: compiled kernels from the private `sdk._C`, each with a NumPy reference.

`sdk._C` is optional. When it was not built (no compiler at install time), or when
MOON3_DISABLE_C=1 is set before `sdk.ops` is first imported, every op runs its NumPy reference;
the two agree to within the op's named tolerance (`L2_NORMALIZE_ATOL`). This module never
imports torch.
"""

from __future__ import annotations

import operator
import os
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from sdk.errors import InvalidInputError

__all__ = ["HAVE_C", "L2_NORMALIZE_ATOL", "L2_NORMALIZE_EPS", "check_dim", "l2_normalize", "l2_normalize_ref"]

# Same eps as torch.nn.functional.normalize: rows with a smaller norm are divided by eps instead.
L2_NORMALIZE_EPS = 1e-12
# Max |compiled - reference| per element; both sum squares in float32, in different orders.
L2_NORMALIZE_ATOL = 1e-6


def _load_compiled() -> ModuleType | None:
    if os.environ.get("MOON3_DISABLE_C") == "1":
        return None
    try:
        import sdk._C as compiled
    except ModuleNotFoundError:  # not built: the references serve
        return None
    except ImportError as exc:  # built but not loadable (ABI or toolchain mismatch): say so
        warnings.warn(
            f"sdk._C is present but failed to load ({exc}); using the slower NumPy reference ops. "
            "Reinstall moon3-sdk to rebuild it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return compiled


_C: Any = _load_compiled()
HAVE_C: bool = _C is not None  # read at every call, so tests can monkeypatch it to False


def check_dim(dim: Any, width: int, hint: str = "the embedding width") -> int:
    """Validate a Matryoshka width: None means `width`; else an int in [1, width].

    Raises:
        InvalidInputError: `dim` is not an int (bools included) or is out of range.
    """
    if dim is None:
        return width
    if isinstance(dim, (bool, np.bool_)):
        raise InvalidInputError(f"dim must be an int, got {dim!r}")
    try:
        dim = operator.index(dim)
    except TypeError:
        raise InvalidInputError(f"dim must be an int, got {type(dim).__name__} {dim!r}") from None
    if not 1 <= dim <= width:
        raise InvalidInputError(f"dim must be in [1, {width}] ({hint}), got {dim}")
    return dim


def l2_normalize_ref(x: npt.ArrayLike, dim: int | None = None) -> npt.NDArray[np.float32]:
    """NumPy reference of `l2_normalize`; does no validation.

    Args:
        x: embeddings, (..., D).
        dim: leading components to keep; None keeps all.

    Returns:
        float32 (..., dim): ``x[..., :dim] / max(||x[..., :dim]||_2, 1e-12)``, computed in float32.
    """
    v = np.asarray(x, dtype=np.float32)[..., :dim]  # (B, dim)
    norm = np.sqrt(np.sum(v * v, axis=-1, keepdims=True))  # (B, 1)
    return v / np.maximum(norm, np.float32(L2_NORMALIZE_EPS))


def l2_normalize(
    x: npt.ArrayLike,
    dim: int | None = None,
    *,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Truncate embeddings to their first `dim` components (Matryoshka) and L2-normalise them.

    Each row becomes ``x[i, :dim] / max(||x[i, :dim]||_2, 1e-12)``, as with
    ``torch.nn.functional.normalize(x[:, :dim], dim=-1)``, so all-zero rows stay zero. Runs the
    compiled kernel (AVX2+FMA where the CPU has it) when `sdk._C` is available, else
    `l2_normalize_ref`; the two agree to within `L2_NORMALIZE_ATOL`.

    Args:
        x: embeddings, (D,) or (B, D), of any real dtype; converted to float32. A C-contiguous
            float32 array is read in place; otherwise only the kept columns are copied.
        dim: number of leading components to keep, in [1, D]; None keeps all D.
        out: optional C-contiguous float32 array of the result's shape ((dim,) for a 1-D `x`,
            else (B, dim)) that receives the result. It may be `x` itself (in place, when `dim`
            is D) but must not otherwise overlap `x`.

    Returns:
        float32 array, (dim,) for a 1-D `x` and (B, dim) for a 2-D one; `out` when given.

    Raises:
        InvalidInputError: `x` is not a 1-D or 2-D array of real numbers, has no columns, or has
            NaN or infinite values in its first `dim` columns (values beyond the float32 range
            become infinite when converted); `dim` is not an integer in [1, D]; or `out` has the
            wrong type, dtype, shape or layout, is read-only, or overlaps `x`.
    """
    arr, squeeze, dim = _finite_rows(x, dim)  # (B, dim) or wider, float32, C-contiguous
    out2d = None if out is None else _checked_out(out, x, arr, dim, squeeze)  # (B, dim)
    if HAVE_C:
        result = _C.l2_normalize(arr, dim, out2d)  # (B, dim)
    else:
        result = l2_normalize_ref(arr, dim)  # (B, dim)
        if out2d is not None:
            out2d[...] = result
    if out is not None:
        return out
    return result[0] if squeeze else result


def _finite_rows(x: npt.ArrayLike, dim: int | None) -> tuple[npt.NDArray[np.float32], bool, int]:
    """`l2_normalize`'s input as C-contiguous float32 rows (B, >= dim) with finite kept columns ->
    (rows, whether `x` was 1-D, dim)."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:  # ragged nested lists, unconvertible objects
        raise InvalidInputError(
            f"x could not be read as an array ({exc}); pass a (B, D) or (D,) array of floats"
        ) from exc
    if arr.dtype.kind not in "fiu":
        raise InvalidInputError(f"x must hold real numbers, got dtype {arr.dtype}; pass float embeddings")
    if arr.ndim not in (1, 2):
        raise InvalidInputError(
            f"x must be (D,) or (B, D), got shape {arr.shape}; reshape it first, e.g. x.reshape(-1, D)"
        )
    squeeze = arr.ndim == 1
    if squeeze:
        arr = arr[None, :]  # (1, D)
    width = arr.shape[1]
    if width == 0:
        raise InvalidInputError(f"x has no components (shape {arr.shape[1:] if squeeze else arr.shape})")

    dim = check_dim(dim, width)

    src_dtype = arr.dtype
    if not (src_dtype == np.float32 and arr.flags.c_contiguous and arr.flags.aligned):
        # Values beyond the float32 range become inf here; the check below reports them.
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.array(arr[:, :dim], dtype=np.float32, order="C")  # (B, dim), fresh and aligned
    kept = arr[:, :dim]  # (B, dim)
    if not np.isfinite(kept).all():
        bad = np.flatnonzero(~np.isfinite(kept).all(axis=1))
        where = "" if squeeze else f" in {bad.size} row(s), first row {bad[0]}"
        cast = " (after conversion to float32)" if src_dtype != np.float32 else ""
        raise InvalidInputError(
            f"x has NaN or infinite values{cast}{where}; fix or drop those embeddings before "
            "normalising (a NaN usually means the model produced a bad output)"
        )
    return arr, squeeze, dim


def _checked_out(out: Any, x: Any, arr: np.ndarray, dim: int, squeeze: bool) -> npt.NDArray[np.float32]:
    """`l2_normalize`'s `out` checked -> its (B, dim) view."""
    expected = (dim,) if squeeze else (arr.shape[0], dim)
    if not isinstance(out, np.ndarray):
        raise InvalidInputError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != np.float32:
        raise InvalidInputError(f"out must have dtype float32, got {out.dtype}")
    if out.shape != expected:
        raise InvalidInputError(f"out must have shape {expected}, got {out.shape}")
    if not (out.flags.c_contiguous and out.flags.aligned):
        raise InvalidInputError(
            "out must be C-contiguous and aligned; allocate it with np.empty(shape, np.float32)"
        )
    if not out.flags.writeable:
        raise InvalidInputError("out is read-only")
    if out is not x and np.may_share_memory(out, arr):
        raise InvalidInputError(
            "out overlaps x; pass a separate buffer, or x itself to normalise in place"
        )
    return out[None, :] if squeeze else out  # (B, dim)
