"""research.late_fusion: photo + title vectors blended with the same embedder's single-modality ones."""

import numpy as np

from research.late_fusion import LateFusion


class Fixed:
    """A subject whose vectors depend only on what each item has."""

    image_tower = "own tower"

    def embed(self, images=None, texts=None):
        n = len(images if images is not None else texts)
        out = np.zeros((n, 3), np.float32)
        for i in range(n):
            has_photo = images is not None and images[i] is not None
            has_title = texts is not None and texts[i] is not None
            out[i] = [1, 0, 0] if has_photo and has_title else [0, 1, 0] if has_photo else [0, 0, 1]
        return out


def test_only_photo_and_title_items_are_blended():
    blend = LateFusion(Fixed(), 0.5)
    got = blend.embed(images=["a", "b", None], texts=["t", None, "u"])
    want = np.array([1, 0.5, 0.5]) / np.linalg.norm([1, 0.5, 0.5])
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    np.testing.assert_allclose(got[1:], [[0, 1, 0], [0, 0, 1]])  # single-modality items as the embedder gives them
    np.testing.assert_allclose(blend.embed(texts=["t"]), [[0, 0, 1]])
    np.testing.assert_allclose(LateFusion(Fixed(), 0).embed(images=["a"], texts=["t"]), [[1, 0, 0]])
    assert blend.image_tower == "own tower"  # the suite reads the wrapped embedder's attributes


def test_a_title_only_blend_leaves_the_photo_vector_out():
    got = LateFusion(Fixed(), 0.0, 2.0).embed(images=["a", "b"], texts=["t", None])
    np.testing.assert_allclose(got[0], np.array([1, 0, 2]) / np.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(got[1], [0, 1, 0])
    mixed = LateFusion(Fixed(), 0.5, 1.0).embed(images=["a"], texts=["t"])[0]
    np.testing.assert_allclose(mixed, np.array([1, 0.5, 1]) / 1.5, rtol=1e-6)
