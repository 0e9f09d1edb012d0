"""Pictures made in code for the tests (numpy only)."""

import numpy as np


def gradient(seed: int, h: int = 64, w: int = 48) -> np.ndarray:
    """A smooth, distinct HWC uint8 picture (gradients survive the 32x32 pooling of the tiny tower)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(-1, 1, (3, 3))
    img = np.stack([a[k] * x + b[k] * y + c[k] for k in range(3)], -1)
    img = (img - img.min()) / (np.ptp(img) + 1e-9)
    return (img * 255).astype(np.uint8)
