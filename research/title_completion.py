"""What a title written from a photo can add to photo -> title search (MMPCBench's photo-only
products), and where the headroom is.

    python -m research.title_completion --catalog ../shared/data/catalog --features .cache/features \
        --engine EMBEDDER.engine --reasoner-engine moon3.engine --out docs/results/title_completion.json

Products: the leak-free validation photos. Query: the product's photo, alone or with a written
title; gallery: every validation product's real title (text-only vectors); a hit shares the
query's normalised title (R@1, R@10), as the suite's cross-modal family scores it.

A written title enters the query two ways:
  joint   photo + title through the embedder's fusion, as `sdk.Pipeline(complete_title=True)` does;
  blend   normalise(photo vector + w * the title's text-only vector): the written title as a
          separate, down-weighted modality, for w in `WEIGHTS`.

Written titles:
  reasoner caption    the engine's reasoner, `caption` task, greedy (what Pipeline writes today);
  heads: ...          the engine's attribute heads (`Reasoner.read`): the fields they are sure of,
                      in the catalog's title order;
  brand (kNN) ...     the brand of the nearest training photos (tower features, cosine, k=10,
                      softmax weights at temperature 0.05), written when its weight share clears
                      0.5; with the heads' fields after it;
  oracle brand, oracle brand + heads, oracle title
                      the product's real brand / title: what a perfect reader would add.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

WEIGHTS = (0.1, 0.2, 0.35, 0.5)
BRAND_K, BRAND_TEMP, BRAND_MIN = 10, 0.05, 0.5


def knn_brand(train_x: np.ndarray, train_brand: list[str], query_x: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(brand, weight share) per query row: softmax-weighted vote of its BRAND_K nearest training rows."""
    mu = train_x.mean(0)
    a, b = train_x - mu, query_x - mu
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    sim = b @ a.T
    top = np.argpartition(-sim, BRAND_K, 1)[:, :BRAND_K]
    brands, shares = [], []
    for i in range(len(b)):
        votes: Counter = Counter()
        for j, w in zip(top[i], np.exp(sim[i, top[i]] / BRAND_TEMP)):
            votes[train_brand[j]] += float(w)
        best, w = votes.most_common(1)[0]
        brands.append(best)
        shares.append(w / sum(votes.values()))
    return brands, np.array(shares)


def compose(read: dict, keys=("gender", "colour", "article type")) -> str:
    return " ".join(read[k][0] for k in keys if k in read)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--features", required=True, type=Path, help="feature cache (sdk.train.features): the kNN brand reader")
    ap.add_argument("--engine", required=True, help="engine whose embedder makes the vectors")
    ap.add_argument("--reasoner-engine", required=True, help="engine whose reasoner (with attribute heads) writes")
    ap.add_argument("--limit", type=int, default=0, help="first N validation photos (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    from tqdm import tqdm

    import sdk
    from sdk.train.attribute_heads import photo_split, pooled
    from sdk.train.catalog import normalize_title
    from sdk.train.metrics import normalize_rows, recall_at_k

    t0 = time.time()
    row, split, train, val = photo_split(args.catalog, args.features)
    val = val[: args.limit] if args.limit else val
    brand_of = lambda p: str(p.record.get("brand") or "").strip()  # noqa: E731

    emb = sdk.Embedder(args.engine, threads=args.threads)
    reasoner = sdk.Reasoner(args.reasoner_engine, threads=args.threads)
    if not reasoner.heads:
        raise SystemExit(f"{args.reasoner_engine}: its reasoner has no attribute heads")

    def vectors(images=None, texts=None):
        n = len(images if images is not None else texts)
        return np.concatenate([emb.embed(None if images is None else images[s:s + 64],
                                         None if texts is None else texts[s:s + 64]) for s in range(0, n, 64)])

    keys: dict[str, int] = {}
    key = np.array([keys.setdefault(normalize_title(p.title), len(keys)) for p in val])
    images = [str(p.image) for p in val]
    photo, gallery = vectors(images=images), vectors(texts=[p.title for p in val])

    def recall(q):
        return recall_at_k(q, gallery, key, key)

    captions, reads = [], []
    for p in tqdm(val, desc="reasoner: caption and heads", unit="photo"):
        captions.append(reasoner.generate(image=str(p.image), task="caption", max_new_tokens=24))
        reads.append(reasoner.read(str(p.image)))
    x = pooled(args.features)
    brand, share = knn_brand(x[[row[p.id] for p in train]], [brand_of(p) for p in train], x[[row[p.id] for p in val]])
    sure = share >= BRAND_MIN
    written = {
        "reasoner caption": captions,
        "heads: gender article type": [compose(r, ("gender", "article type")) for r in reads],
        "heads: gender colour article type": [compose(r) for r in reads],
        "brand (kNN, share >= 0.5)": [b if s else "" for b, s in zip(brand, sure)],
        "brand (kNN, share >= 0.5) + heads": [f"{b if s else ''} {compose(r)}".strip()
                                              for b, s, r in zip(brand, sure, reads)],
        "oracle brand": [brand_of(p) for p in val],
        "oracle brand + heads": [f"{brand_of(p)} {compose(r)}".strip() for p, r in zip(val, reads)],
        "oracle title": [p.title for p in val],
    }
    results = {}
    for name, titles in tqdm(written.items(), desc="embedding written titles"):
        text = np.zeros_like(photo)  # nothing written: nothing added
        rows = [i for i, t in enumerate(titles) if t]
        if rows:
            text[rows] = vectors(texts=[titles[i] for i in rows])
        joint = vectors(images=images, texts=[t or None for t in titles])
        results[name] = {"examples": titles[:3], "joint": recall(joint),
                         **{f"blend {w}": recall(normalize_rows(photo + w * text)) for w in WEIGHTS}}
    gold = np.array([brand_of(p) for p in val])
    report = {
        "command": "python -m research.title_completion " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "split": split.summary(), "photos": len(val), "photo only": recall(photo),
        "brand reader": {"accuracy": round(float((np.array(brand) == gold).mean()), 4),
                         "written share": round(float(sure.mean()), 4),
                         "precision when written": round(float((np.array(brand)[sure] == gold[sure]).mean()), 4)},
        "written": results, "seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))
    return 0


def render(report: dict) -> str:
    """The report as a markdown table: R@1 / R@10 of photo -> title per written title and mode."""
    modes = ["joint", *[f"blend {w}" for w in WEIGHTS]]
    po = report["photo only"]
    lines = [f"Photo only: R@1 {po['R@1']:.3f}, R@10 {po['R@10']:.3f} ({report['photos']} validation photos).", "",
             "| written title | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for name, r in report["written"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[m]['R@1']:.3f} / {r[m]['R@10']:.3f}" for m in modes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render(json.loads(Path(sys.argv[2]).read_text())))
    else:
        sys.exit(main())
