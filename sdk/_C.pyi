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

_F32 = npt.NDArray[np.float32]

# The fused ops below read and write the caller's arrays where they lie: every array argument must
# be a C-contiguous, aligned float32 ndarray (TypeError: not an ndarray, another dtype; ValueError:
# strided, unaligned, misshapen), never converted. sdk.fused accepts anything and copies instead.
# `out`, where given, receives the result and is returned: exactly the result's shape, writeable,
# overlapping no input except the in-place alias each op names (ValueError otherwise).

def fusion_epilogue(
    q: _F32, outs: _F32, logits: _F32, present: _F32, out_w: _F32, out_b: _F32, ln_w: _F32, ln_b: _F32,
    out: tuple[_F32 | None, _F32 | None, _F32 | None] | None = None,
    *,
    force_scalar: bool = False,
) -> tuple[_F32, _F32, _F32]:
    """Modality-fusion epilogue -> (q_new, LayerNorm(q_new), gate); see sdk.fused.fusion_epilogue.

    `out` is None or a 3-tuple (q_new, h, gate), each an array or None (fresh); q_new may be q.
    """

def fire_residual(
    h: _F32, shallow: _F32, norm_w: _F32, norm_b: _F32, gate_in_w: _F32, gate_in_b: _F32, gate_out_w: _F32,
    gate_out_b: float, mlp_norm_w: _F32, mlp_norm_b: _F32, mlp_in_w: _F32, mlp_in_b: _F32, mlp_out_w: _F32,
    mlp_out_b: _F32, scale: float, out: _F32 | None = None, *, force_scalar: bool = False,
) -> _F32:
    """FIRE residual enhancement of (R, d) token states, into `out` (R, d) if given (it may be h)."""

def project_normalize(
    q: _F32, ln_w: _F32, ln_b: _F32, w: _F32, b: _F32, dim: int, out: _F32 | None = None, *,
    force_scalar: bool = False,
) -> _F32:
    """LayerNorm -> projection -> Matryoshka truncation -> L2 norm, into `out` (B, dim) if given (it may be q)."""

def linear(x: _F32, w: _F32, b: _F32 | None = None, force_scalar: bool = False) -> _F32:
    """x @ w.T + b for x (..., k), w (m, k) in PyTorch's layout; one thread, no BLAS."""

def fused_kernel() -> Literal["avx2", "scalar"]:
    """Name of the matrix kernel the fused ops run here."""

class FusionHeadKernel:
    """The whole embedder head in one call (weights copied and packed at construction); see sdk.head.FusionHead.

    Raises ValueError naming a missing or misshapen weight, or an inconsistent configuration.
    """

    def __init__(
        self, weights: dict[str, _F32], d_model: int, n_heads: int, n_fusion_layers: int, out_dim: int,
        text_dim: int, ffn_mult: int = 4,
    ) -> None: ...
    def __call__(
        self, image_tokens: _F32, text_states: _F32, text_mask: _F32, trace_states: _F32, trace_mask: _F32,
        present: _F32, dim: int, skip: _F32 | None = None, force_scalar: bool = False,
        source: npt.NDArray[np.int64] | None = None,
    ) -> _F32:
        """(B, N, d), (B, T, C), (B, T), (B, S, C), (B, S), (R, 3) -> (R, dim) L2-normalised embeddings.

        `skip` (R, out_dim) is added before the truncation and norm. `source` (R ints) names the
        token row each query row reads (default: R == B, row r reads row r); rows that share a token
        row share its K/V projections. Masks are 0/1; padded and absent positions are never read into
        the result. The GIL is released while it runs; one object may be called from many threads.
        """
