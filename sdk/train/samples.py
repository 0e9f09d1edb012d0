"""Cut the small sample catalog shipped in the repo (data/samples) from a full catalog.

    python -m sdk.train.samples --catalog ../shared/data/catalog --out data/samples

Takes validation-split products only (never trained on), a seeded random draw plus a few
products without a photo; photos are downsized to 168x224 JPEG (users' catalogs are mostly JPEG).

`--calib-out data/calib` (with `--calib-only`: only that) writes the build's default text
calibration set: the titles that `moon3 build --catalog` calibrates SmoothQuant on (256 of the
train split, stratified by article type), so a build without the catalog calibrates on the same
titles.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from .catalog import catalog_records, catalog_split, read_catalog, stratified_records

SAMPLE_SIZE = (168, 224)


def write_calibration_titles(catalog: str | Path, out: Path, n: int = 256) -> Path:
    """The catalog's text calibration titles (`CalibrationSet.text_from_catalog`'s draw: train
    split, stratified by article type, seed 0) as items.jsonl records of id, title and article
    type."""
    picked = stratified_records(catalog_records(catalog, True), n, 0)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "items.jsonl").open("w", encoding="utf-8") as f:
        for r in sorted(picked, key=lambda r: int(r["id"])):
            f.write(json.dumps({"id": r["id"], "title": r["title"], "article_type": r.get("article_type")},
                               ensure_ascii=False) + "\n")
    print(f"wrote {len(picked)} calibration titles to {out}")
    return out / "items.jsonl"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--out", default="data/samples")
    ap.add_argument("--n", type=int, default=150, help="products with a photo")
    ap.add_argument("--n-text-only", type=int, default=6, help="products without a photo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-out", default=None, help="also write the text calibration titles here (data/calib)")
    ap.add_argument("--calib-n", type=int, default=256, help="calibration titles (the build's calib_items)")
    ap.add_argument("--calib-only", action="store_true", help="write only the calibration titles (--calib-out)")
    args = ap.parse_args(argv)
    if args.calib_only and not args.calib_out:
        ap.error("--calib-only needs --calib-out")
    if args.calib_out:
        write_calibration_titles(args.catalog, Path(args.calib_out), args.calib_n)
        if args.calib_only:
            return
    split = catalog_split(args.catalog)
    val = [p for p in read_catalog(args.catalog) if split.is_validation(p.id)]
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
