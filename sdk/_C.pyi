"""Type stubs of the private compiled module `sdk._C` (built from csrc/); use `sdk.ops` instead."""

from typing import Literal

import numpy as np
import numpy.typing as npt

__version__: str

def l2_normalize(
    x: npt.NDArray[np.float32],
    dim: int,
    out: npt.NDArray[np.float32] | None = None,
    *,
    force_scalar: bool = False,
) -> npt.NDArray[np.float32]:
    """(B, D) -> (B, dim) rows x[i, :dim] / max(||x[i, :dim]||_2, 1e-12), written into `out` if given.

    `x` and `out` must be C-contiguous, aligned float32; nothing is copied; `out` may be `x`.
    Raises TypeError (not an ndarray, dtype not float32) or ValueError (not 2-D, not C-contiguous,
    unaligned, dim outside [1, D], out of the wrong shape, read-only or overlapping x).
    """

def l2_normalize_kernel() -> Literal["avx2", "scalar"]:
    """The kernel `l2_normalize` runs on this CPU unless force_scalar is set."""

def cpu_features() -> dict[str, bool]:
    """{'avx2': bool, 'fma': bool}: the CPU features the kernels dispatch on."""
