"""Do two builds of an engine give the same vectors? Embed the sample products with each and compare.

    # each engine embedded by the sdk that built it (PYTHONPATH picks the checkout):
    PYTHONPATH=/path/to/old/checkout python scripts/same_vectors.py embed old.engine old.npz
    python scripts/same_vectors.py embed new.engine new.npz
    python scripts/same_vectors.py compare old.npz new.npz --out docs/results/same_vectors.json \
        --label "before=8752e93" --label "after=HEAD"

`embed` writes the vectors of every sample product in three views (photo + title, title alone, photo
alone) with `sdk.Embedder` (only its public API, so it runs against older checkouts too); `compare`
writes the largest absolute difference and the smallest cosine per view.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
VIEWS = ("photo+title", "title", "photo")


def embed(engine: Path, out: Path, samples: Path = SAMPLES) -> None:
    import sdk
    from sdk import Embedder

    records = [json.loads(line) for line in (samples / "items.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    with_photo = [r for r in records if r.get("image")]
    views = {"photo+title": with_photo, "title": [{"title": r["title"]} for r in records],
             "photo": [{"image": r["image"], "title": None} for r in with_photo]}
    with Embedder(engine, threads=1) as emb:
        vectors = {v: emb.embed_products(views[v], root=samples) for v in VIEWS}
    np.savez(out, sdk_file=str(Path(sdk.__file__).parent), **{v: vectors[v] for v in VIEWS})
    print(f"{engine}: {', '.join(f'{v} {vectors[v].shape}' for v in VIEWS)} with the sdk in {Path(sdk.__file__).parent}")


def compare(a: Path, b: Path, labels: list[str]) -> dict:
    x, y = np.load(a), np.load(b)
    views = {}
    for v in VIEWS:
        p, q = x[v].astype(np.float64), y[v].astype(np.float64)
        if p.shape != q.shape:
            raise SystemExit(f"{v}: {p.shape} vs {q.shape}: the engines embedded different products")
        cos = (p * q).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(q, axis=1))
        views[v] = {"items": int(len(p)), "max_abs_diff": float(np.abs(p - q).max()), "min_cosine": float(cos.min())}
    worst = max(r["max_abs_diff"] for r in views.values())
    return {"labels": labels, "views": views, "max_abs_diff": worst, "same_within_1e-6": worst <= 1e-6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed")
    e.add_argument("engine", type=Path)
    e.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--out", type=Path, default=None)
    c.add_argument("--label", action="append", default=[], help="what each side is, e.g. before=COMMIT")
    args = ap.parse_args(argv)
    if args.cmd == "embed":
        embed(args.engine, args.out)
        return 0
    report = compare(args.a, args.b, args.label)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["same_within_1e-6"] else 1


if __name__ == "__main__":
    sys.exit(main())
