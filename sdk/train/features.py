"""Cache the frozen towers' features for a catalog, so training touches only the trained parts.

    python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features

Writes, per product (rows in catalog order, ids in meta.json):
  img_deep (N, 49, 1280) fp16, img_shallow (N, 49, 152) fp16, has_image (N,) bool,
  title_tok (N, 32, 384) fp16 + title_mask, detail_tok (N, 96, 384) fp16 + detail_mask,
  and for validation products (the catalog's leak-free split, `catalog.Split`; their ids in
  meta.json) the horizontally flipped photo's maps (img_*_flip) as a second view.

For a distilled student's cheaper towers (`sdk.export.distill`), `--image-size 160 --text-layers 3`
caches what they give instead (25 image tokens, the states after MiniLM's third layer):

    python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features_s160_l3 \
        --image-size 160 --text-layers 3

`--image-mid-blocks K` also caches the map entering EfficientNet's last K blocks (img_mid, and
img_mid_flip for the validation flips), for a student that fine-tunes those blocks.

`--renditions K` adds, to a new or an existing cache of the same catalog, the image maps of K
random renditions of every photo (`augment.rendition`: thumbnail, JPEG, crop, grayscale, light;
img_deep_aug (N, K, 49, 1280), img_shallow_aug) and the MiniLM states of each product's field
captions (`augment.captions`; caption_tok (N, 2, 16, 384) + caption_mask), the views that teach
the embedder to keep a photo's identity under degradation:

    python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features --renditions 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdk.preprocess import ImagePreprocess, TextTokenizer, image_to_array, load_image

from .augment import CAPTIONS, captions, rendition
from .catalog import Product, Split, read_catalog
from .fusion_model import MAX_IMAGE_TUNED_BLOCKS
from .tower_tails import IMAGE_BLOCKS
from .towers import (
    DEEP_DIM,
    SHALLOW_DIM,
    TEXT_DIM,
    load_image_tower,
    load_text_tower,
    text_tower_path,
)

TITLE_LEN = 32
DETAIL_LEN = 96
TRACE_LEN = 128  # the engine's trace token budget (manifest preprocess.trace.max_length)
CAPTION_LEN = 16


@torch.no_grad()
def image_features(tower, images, cfg: ImagePreprocess, batch: int = 32, flip: bool = False, desc="images",
                   mid_block: int | None = None, transform=None):
    """Run the image tower over PIL-loadable sources -> (deep, shallow) fp16 arrays, and with
    `mid_block` the map entering that block as a third (N, C, grid, grid) array. `transform(i,
    img)` may replace photo i (a PIL image) before preprocessing."""
    n, tokens = len(images), getattr(tower, "grid", 7) ** 2
    deep = np.zeros((n, tokens, DEEP_DIM), np.float16)
    shallow = np.zeros((n, tokens, SHALLOW_DIM), np.float16)
    mid = None
    load = (lambda i, p: load_image(p, name=str(p))) if transform is None else (  # noqa: E731
        lambda i, p: transform(i, load_image(p, name=str(p))))
    for s in tqdm(range(0, n, batch), desc=desc, unit="batch"):
        xs = [image_to_array(load(s + j, p), cfg) for j, p in enumerate(images[s : s + batch])]
        x = torch.from_numpy(np.stack(xs))
        if flip:
            x = torch.flip(x, dims=[3])
        out = tower(x) if mid_block is None else tower(x, mid_block=mid_block)
        deep[s : s + len(xs)] = out[0].numpy()
        shallow[s : s + len(xs)] = out[1].numpy()
        if mid_block is not None:
            if mid is None:
                mid = np.zeros((n, *out[2].shape[1:]), np.float16)
            mid[s : s + len(xs)] = out[2].numpy()
    return (deep, shallow) if mid_block is None else (deep, shallow, mid)


@torch.no_grad()
def text_features(model, tok: TextTokenizer, texts: list[str], batch: int = 64, desc="texts"):
    """MiniLM token states for texts, length-sorted for speed -> (states fp16, mask uint8)."""
    n, t = len(texts), tok.max_length
    states = np.zeros((n, t, TEXT_DIM), np.float16)
    mask = np.zeros((n, t), np.uint8)
    order = np.argsort([len(x) for x in texts], kind="stable")
    for s in tqdm(range(0, n, batch), desc=desc, unit="batch"):
        idx = order[s : s + batch]
        ids, m = tok([texts[i] for i in idx])
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(m))
        h = out.last_hidden_state.numpy()
        states[idx, : h.shape[1]] = h
        mask[idx, : m.shape[1]] = m
    return states, mask


def compare_scaling(tower, products: list[Product], n: int = 800) -> dict:
    """Leave-one-out 1-NN article-type accuracy of pooled image features, per input scaling."""
    with_img = [p for p in products if p.image is not None]
    rng = np.random.default_rng(0)
    pick = [with_img[i] for i in rng.choice(len(with_img), size=min(n, len(with_img)), replace=False)]
    labels = np.array([p.article_type for p in pick])
    result = {}
    for scale in ("pm1", "imagenet"):
        deep, _ = image_features(tower, [p.image for p in pick], ImagePreprocess(scale=scale), desc=f"scale={scale}")
        v = deep.astype(np.float32).mean(1)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        result[scale] = float((labels[sim.argmax(1)] == labels).mean())
    return result


def add_views(out: Path, products: list[Product], tower, text, cfg: ImagePreprocess, k: int, seed: int = 0) -> dict:
    """Cache K random renditions of every photo (img_deep_aug/img_shallow_aug, (N, K, tokens, C))
    and every product's field captions (caption_tok (N, CAPTIONS, CAPTION_LEN, 384) + caption_mask)
    into `out`; returns what goes into meta.json."""
    rows = np.flatnonzero([p.image is not None for p in products])
    tokens = tower.grid ** 2
    deep = np.zeros((len(products), k, tokens, DEEP_DIM), np.float16)
    shallow = np.zeros((len(products), k, tokens, SHALLOW_DIM), np.float16)
    for j in range(k):
        # one generator per (product, draw): the same rendition whatever the batch or the row order
        draw = lambda i, img: rendition(img, np.random.default_rng([seed, j, products[rows[i]].id]))  # noqa: E731
        d, sh = image_features(tower, [products[i].image for i in rows], cfg, desc=f"renditions {j + 1}/{k}",
                               transform=draw)
        deep[rows, j], shallow[rows, j] = d, sh
    np.save(out / "img_deep_aug.npy", deep)
    np.save(out / "img_shallow_aug.npy", shallow)
    del deep, shallow
    texts = [c for p in products for c in captions(p.record)]
    st, m = text_features(text, TextTokenizer(text_tower_path() / "tokenizer.json", CAPTION_LEN), texts, desc="captions")
    np.save(out / "caption_tok.npy", st.reshape(len(products), CAPTIONS, *st.shape[1:]))
    np.save(out / "caption_mask.npy", m.reshape(len(products), CAPTIONS, -1))
    return {"renditions": k, "rendition_seed": seed, "captions": CAPTIONS}


def _cache_photos(out: Path, products: list, tower, cfg: ImagePreprocess, mid_block: int | None, meta: dict) -> None:
    """Cache every photo's deep and shallow tokens (and the map entering `mid_block`), and the
    validation photos' mirrored views; record the split in `meta`."""
    has = np.array([p.image is not None for p in products])
    deep = np.zeros((len(products), tower.grid ** 2, DEEP_DIM), np.float16)
    shallow = np.zeros((len(products), tower.grid ** 2, SHALLOW_DIM), np.float16)
    rows = np.flatnonzero(has)
    got = image_features(tower, [products[i].image for i in rows], cfg, mid_block=mid_block)
    if mid_block is not None and got[2] is None:
        raise SystemExit("--image-mid-blocks needs products with a photo; this catalog has none")
    deep[rows], shallow[rows] = got[0], got[1]
    np.save(out / "img_deep.npy", deep)
    np.save(out / "img_shallow.npy", shallow)
    np.save(out / "has_image.npy", has)
    if mid_block is not None:
        mid = np.zeros((len(products), *got[2].shape[1:]), np.float16)
        mid[rows] = got[2]
        np.save(out / "img_mid.npy", mid)
        del mid
    del deep, shallow, got

    split = Split.of(products)
    meta["split"] = split.summary()
    meta["validation_ids"] = sorted(split.validation_ids)
    val_rows = np.array([i for i in rows if split.is_validation(products[i].id)], np.int64)
    got = image_features(tower, [products[i].image for i in val_rows], cfg, flip=True, desc="val flipped",
                         mid_block=mid_block)
    np.save(out / "val_flip_rows.npy", val_rows)
    np.save(out / "img_deep_flip.npy", got[0])
    np.save(out / "img_shallow_flip.npy", got[1])
    if mid_block is not None:
        np.save(out / "img_mid_flip.npy", got[2])



def _cache_texts(out: Path, products: list, text) -> None:
    """Cache the titles' and the descriptions' MiniLM token states and masks."""
    tok_path = text_tower_path() / "tokenizer.json"
    st, m = text_features(text, TextTokenizer(tok_path, TITLE_LEN), [p.title for p in products], desc="titles")
    np.save(out / "title_tok.npy", st)
    np.save(out / "title_mask.npy", m)
    st, m = text_features(text, TextTokenizer(tok_path, DETAIL_LEN), [p.detail_text for p in products], desc="details")
    np.save(out / "detail_tok.npy", st)
    np.save(out / "detail_mask.npy", m)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True, help="folder holding items.jsonl and images/")
    ap.add_argument("--out", default=".cache/features", help="output folder")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N products (smoke runs)")
    ap.add_argument("--compare-scaling", type=int, default=0, metavar="N",
                    help="first measure 1-NN article-type accuracy of both input scalings on N photos")
    ap.add_argument("--scale", choices=("pm1", "imagenet"), default="pm1")
    ap.add_argument("--image-size", type=int, default=224, help="photo side in pixels (a multiple of 32)")
    ap.add_argument("--text-layers", type=int, default=None, help="keep only the first N MiniLM layers")
    ap.add_argument("--image-mid-blocks", type=int, default=0, metavar="K",
                    help="also cache the map entering EfficientNet's last K blocks (img_mid), for a student "
                         "that fine-tunes them (sdk.export.distill --tune-image-blocks K)")
    ap.add_argument("--renditions", type=int, default=0, metavar="K",
                    help="also cache K random renditions of every photo and the products' field captions; on an "
                         "existing cache of the same catalog only these are added")
    ap.add_argument("--seed", type=int, default=0, help="seed of the renditions")
    args = ap.parse_args(argv)
    if args.renditions < 0:
        ap.error("--renditions must be >= 0")
    if not 0 <= args.image_mid_blocks <= MAX_IMAGE_TUNED_BLOCKS:
        ap.error(f"--image-mid-blocks must be in 0..{MAX_IMAGE_TUNED_BLOCKS}")
    mid_block = IMAGE_BLOCKS - args.image_mid_blocks if args.image_mid_blocks else None

    torch.set_num_threads(max(1, torch.get_num_threads()))
    products = read_catalog(args.catalog)
    if args.limit:
        products = products[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tower = load_image_tower(image_size=args.image_size)
    text = load_text_tower(layers=args.text_layers)
    if args.renditions and (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if meta["ids"] != [p.id for p in products] or meta.get("image_size", 224) != args.image_size:
            ap.error(f"{out} caches other products or another photo size: give a new --out")
        cfg = ImagePreprocess(scale=meta.get("scale", "pm1"), size=args.image_size)
        meta.update(add_views(out, products, tower, text, cfg, args.renditions, args.seed))
        (out / "meta.json").write_text(json.dumps(meta))
        print(f"{args.renditions} renditions and captions of {len(products)} products in {time.time() - t0:.0f} s -> {out}")
        return
    meta: dict = {"ids": [p.id for p in products], "catalog": str(args.catalog), "scale": args.scale,
                  "image_size": args.image_size, "text_layers": len(text.encoder.layer)}
    if mid_block is not None:
        meta["image_mid_block"] = mid_block
    if args.compare_scaling:
        meta["scaling_1nn_article_type"] = compare_scaling(tower, products, args.compare_scaling)
        print("input scaling, 1-NN article-type accuracy:", meta["scaling_1nn_article_type"])
    cfg = ImagePreprocess(scale=args.scale, size=args.image_size)

    _cache_photos(out, products, tower, cfg, mid_block, meta)
    _cache_texts(out, products, text)
    if args.renditions:
        meta.update(add_views(out, products, tower, text, cfg, args.renditions, args.seed))
    meta["seconds"] = round(time.time() - t0, 1)
    (out / "meta.json").write_text(json.dumps(meta))
    print(f"features for {len(products)} products in {meta['seconds']} s -> {out}")


if __name__ == "__main__":
    main()
