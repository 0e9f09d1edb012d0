"""Training renditions of product photos, and field captions of products.

A photo is seen in the wild as a thumbnail, a recompressed JPEG, a crop, a grayscale print, under
other light. `rendition(img, rng)` draws one such rendition at random (parameters drawn per call,
wider than the validation suite's fixed renditions, so training does not fit those exact ones);
`sdk.train.features --renditions K` caches the towers' features of K of them per photo and the
embedder trains photo views on them (`TrainConfig.rendition_prob`, `image_instance`).

`captions(record)` writes short texts from a product's catalog fields (gender, colour, article
type, usage), other wordings than the suite's zero-shot prompts: extra text views of a product.
"""

from __future__ import annotations

import io

import numpy as np

CAPTIONS = 2  # captions per product (`captions`)


def rendition(img, rng: np.random.Generator):
    """One random rendition of an RGB PIL photo: each of downscale-and-back, JPEG, crop,
    grayscale and colour jitter applies with its own probability, at least one always."""
    from PIL import Image, ImageEnhance

    w, h = img.size
    ops = rng.random(5) < np.array([0.5, 0.5, 0.5, 0.2, 0.5])
    if not ops.any():
        ops[rng.integers(0, 5)] = True
    if ops[2]:  # crop: 55-90% of each side, anywhere
        f = rng.uniform(0.55, 0.9)
        cw, ch = max(8, round(w * f)), max(8, round(h * f))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x, y, x + cw, y + ch))
    if ops[4]:  # light: brightness, contrast, saturation
        for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enh(img).enhance(float(rng.uniform(0.7, 1.3)))
    if ops[3]:
        img = img.convert("L").convert("RGB")
    if ops[0]:  # a thumbnail of 15-50% of the side, back to size
        f = rng.uniform(0.15, 0.5)
        size = img.size
        small = (max(8, round(size[0] * f)), max(8, round(size[1] * f)))
        img = img.resize(small, Image.BILINEAR).resize(size, Image.BILINEAR)
    if ops[1]:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(10, 51)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def captions(record: dict) -> list[str]:
    """`CAPTIONS` texts from a product's fields; a field the record lacks is left out (a record
    with none of them gives its title)."""
    f = {k: str(record.get(k) or "").strip() for k in ("gender", "base_colour", "article_type", "usage")}
    first = " ".join(x for x in (f["gender"], f["base_colour"], f["article_type"]) if x)
    second = f"{f['article_type']} for {f['usage'].lower()} wear" if f["article_type"] and f["usage"] else f["article_type"]
    title = str(record.get("title") or "")
    return [first or title, second or first or title]
