"""Embed the shipped sample products with the reference embedder and show nearest products.

    python -m sdk.train.quickstart [--samples data/samples] [--query "red running shoes" ...]

Prints, for a few text queries and a few product photos, the 5 nearest sample products, and
the sample set's own text->image recall, so a person can check the vectors make sense.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..paths import SAMPLES, WEIGHTS

DEFAULT_QUERIES = (  # title-like queries, as the model was trained on product titles
    "Men Black Analog Watch",
    "Women Black Handbag",
    "Men Blue Jeans",
    "Boys White T-shirt",
    "Men Sports Shoes",
)


def read_samples(folder: Path) -> list[dict]:
    path = folder / "items.jsonl"
    if not path.is_file():
        raise SystemExit(f"no sample catalog at {path}; pass --samples FOLDER (holding items.jsonl)")
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for it in items:
        it["image_path"] = str(folder / it["image"]) if it.get("image") else None
    return items


def show(title: str, sims: np.ndarray, items: list[dict], k: int = 5, skip: int | None = None) -> None:
    print(title)
    order = [i for i in np.argsort(-sims) if i != skip][:k]
    for rank, i in enumerate(order, 1):
        it = items[i]
        print(f"  {rank}. {sims[i]:.3f}  {it['title']}  [{it['article_type']}, {it['base_colour']}]")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, default=SAMPLES, help="folder with items.jsonl + images")
    ap.add_argument("--query", action="append", help="a text query (repeatable); default: a few examples")
    ap.add_argument("--weights", type=Path, default=None, help="folder with embedder.safetensors/.json")
    args = ap.parse_args(argv)

    from .reference import ReferenceEmbedder

    items = read_samples(args.samples)
    t0 = time.time()
    ref = ReferenceEmbedder(args.weights or WEIGHTS)
    t_load = time.time() - t0
    t0 = time.time()
    products = ref.embed(images=[it["image_path"] for it in items], texts=[it["title"] for it in items])
    photos_idx = [i for i, it in enumerate(items) if it["image_path"]]
    photos = ref.embed(images=[items[i]["image_path"] for i in photos_idx])
    n_img = len(photos_idx)
    print(
        f"moon3-sdk reference embedder (FP32 PyTorch teacher): loaded in {t_load:.1f} s; embedded "
        f"{len(items)} sample products ({n_img} photo+title, {len(items) - n_img} title only) and "
        f"{n_img} photos alone in {time.time() - t0:.1f} s -> vectors of dim {products.shape[1]}\n"
    )
    queries = args.query or list(DEFAULT_QUERIES)
    q = ref.embed(texts=queries)
    for text, v in zip(queries, q):
        show(f'text query "{text}" -> nearest products (photo+title):', products @ v, items)
        show(f'text query "{text}" -> nearest photos (image only):', _scatter(photos @ v, photos_idx, len(items)), items)
        print()
    for j in photos_idx[:3]:
        show(
            f"photo of #{items[j]['id']} \"{items[j]['title']}\" (image only) -> nearest other products:",
            products @ photos[photos_idx.index(j)],
            items,
            skip=j,
        )
        print()
    titles = ref.embed(texts=[items[i]["title"] for i in photos_idx])
    sims = titles @ photos.T
    keys = np.array([items[i]["title"].lower() for i in photos_idx])
    top = np.argsort(-sims, axis=1)[:, :10]
    r10 = float((keys[top] == keys[:, None]).any(1).mean())
    r1 = float((keys[top[:, 0]] == keys).mean())
    print(f"samples text->image retrieval over {n_img} photos: R@1 {r1:.3f}  R@10 {r10:.3f}")


def _scatter(values: np.ndarray, idx: list[int], n: int) -> np.ndarray:
    full = np.full(n, -np.inf, np.float32)
    full[idx] = values
    return full


if __name__ == "__main__":
    main()
