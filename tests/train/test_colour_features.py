"""research.colour_features: the colour histogram of a product photo's foreground."""

import numpy as np
from PIL import Image

from research.colour_features import BINS, colour_histogram


def test_the_histogram_reads_the_foreground_colour_and_share(tmp_path):
    a = np.full((60, 40, 3), 255, np.uint8)
    a[0:30, 0:40] = [255, 0, 0]  # half the photo red, on a white background
    Image.fromarray(a).save(tmp_path / "red.png")
    h = colour_histogram(tmp_path / "red.png")
    assert h.shape == (BINS**3 + 1,) and h.dtype == np.float32
    assert abs(h[-1] - 0.5) < 0.05  # the foreground share
    assert np.argmax(h[:-1]) == np.ravel_multi_index((BINS - 1, 0, 0), (BINS,) * 3)  # pure red
    assert abs((h[:-1] ** 2).sum() - 1.0) < 1e-5  # square roots of shares that sum to 1
    Image.fromarray(np.full((60, 40, 3), 255, np.uint8)).save(tmp_path / "white.png")
    w = colour_histogram(tmp_path / "white.png")  # no foreground: every pixel counts
    assert w[-1] == 0.0 and np.argmax(w[:-1]) == BINS**3 - 1
