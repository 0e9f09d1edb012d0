"""Random inputs of the head's fused ops, shared by the CPU and CUDA op tests."""

import math

import numpy as np

from sdk.fused import FireParams


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def epilogue_args(B, d, M=3, seed=0):
    rng = np.random.default_rng(seed)
    present = (rng.uniform(size=(B, M)) > 0.4).astype(np.float32)
    present[:, 0] = 1.0  # at least one modality per row
    return (rand(rng, B, d), rand(rng, B, M, d), rand(rng, B, M), present, rand(rng, d, d, scale=1 / math.sqrt(d)),
            rand(rng, d), 1 + rand(rng, d, scale=0.1), rand(rng, d, scale=0.1))


def fire_params(d, Cs, H, seed=0):
    rng = np.random.default_rng(seed)
    return FireParams(
        1 + rand(rng, d, scale=0.1), rand(rng, d, scale=0.1), rand(rng, H, d, scale=1 / math.sqrt(d)), rand(rng, H),
        rand(rng, H, scale=1 / math.sqrt(H)), 0.3, 1 + rand(rng, Cs, scale=0.1), rand(rng, Cs, scale=0.1),
        rand(rng, H, Cs, scale=1 / math.sqrt(Cs)), rand(rng, H), rand(rng, d, H, scale=1 / math.sqrt(H)), rand(rng, d),
        0.7,
    )
