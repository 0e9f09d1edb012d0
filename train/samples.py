"""Cut the small sample catalog shipped in the repo (data/samples) from a full catalog.

    python -m sdk.train.samples --catalog ../shared/data/catalog --out data/samples

Takes validation-split products only (never trained on), a seeded random draw plus a few
products without a photo; photos are downsized to 168x224 JPEG (users' catalogs are mostly JPEG).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from .catalog import is_validation, read_catalog

SAMPLE_SIZE = (168, 224)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--out", default="data/samples")
    ap.add_argument("--n", type=int, default=150, help="products with a photo")
    ap.add_argument("--n-text-only", type=int, default=6, help="products without a photo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    val = [p for p in read_catalog(args.catalog) if is_validation(p.id)]
    rng = random.Random(args.seed)
    with_img = sorted((p for p in val if p.image is not None), key=lambda p: p.id)
    without = sorted((p for p in val if p.image is None), key=lambda p: p.id)
    pick = rng.sample(with_img, args.n) + rng.sample(without, min(args.n_text_only, len(without)))
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "items.jsonl").open("w", encoding="utf-8") as f:
        for p in sorted(pick, key=lambda p: p.id):
            rec = dict(p.record)
            if p.image is not None:
                rec["image"] = f"images/{p.id}.jpg"
                Image.open(p.image).convert("RGB").resize(SAMPLE_SIZE, Image.BICUBIC).save(
                    out / rec["image"], quality=85
                )
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {len(pick)} products to {out}")


if __name__ == "__main__":
    main()
