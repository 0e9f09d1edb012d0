"""Which photo features name a product's catalog colour: the image tower's pooled map, a colour
histogram of the photo's pixels, or both.

    python -m research.colour_features --catalog ../shared/data/catalog --features .cache/features \
        --out docs/results/colour_features.json

ImageNet features do not name catalog colours (the attribute heads read `base_colour` right for
47 % of validation photos, their weakest field). A colour is a property of the pixels, so a
histogram of the product's own pixels (near-white background left out; soft assignment to a
4 x 4 x 4 RGB grid, square-rooted, plus the foreground share) is tried against the pooled
EfficientNet-Lite0 map, each through the same classifier as the heads' (a 512-wide ReLU layer,
full-batch AdamW, 300 steps) on the leak-free training photos, scored on the validation photos
(accuracy over all of them; a colour with fewer than 5 training photos counts as a miss).
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

BINS, SIZE, WHITE = 4, 48, 0.9


def colour_histogram(path, bins: int = BINS, size: int = SIZE) -> np.ndarray:
    """(bins**3 + 1,) float32: the square-rooted soft RGB histogram of the photo's foreground
    (pixels not near-white in every channel; all pixels when fewer than 20 are), then the
    foreground's share of the photo."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size * 2, size * 2))
        x = np.asarray(im.convert("RGB").resize((size, size)), np.float32) / 255.0
    fg = ~(x.min(-1) > WHITE)
    px = x[fg] if fg.sum() > 20 else x.reshape(-1, 3)
    c = px * (bins - 1)
    lo = np.clip(np.floor(c).astype(int), 0, bins - 2)
    f = c - lo
    h = np.zeros((bins, bins, bins), np.float32)
    for corner in np.ndindex(2, 2, 2):  # trilinear: each pixel shares itself among its 8 grid corners
        w = np.prod([f[:, k] if corner[k] else 1 - f[:, k] for k in range(3)], axis=0)
        np.add.at(h, (lo[:, 0] + corner[0], lo[:, 1] + corner[1], lo[:, 2] + corner[2]), w)
    h = h.ravel() / max(float(h.sum()), 1e-6)
    return np.concatenate([np.sqrt(h), [fg.mean()]]).astype(np.float32)


def accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_gold: np.ndarray,
             classes: list[str], seed: int = 0) -> float:
    """The heads' classifier on these features: validation accuracy."""
    import torch

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], 512), torch.nn.ReLU(), torch.nn.Linear(512, len(classes)))
    opt = torch.optim.AdamW(m.parameters(), 3e-3, weight_decay=1e-4)
    a = torch.from_numpy(((train_x - mu) / sd).astype(np.float32))
    y = torch.from_numpy(train_y)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(a), y).backward()
        opt.step()
    with torch.no_grad():
        pred = m(torch.from_numpy(((val_x - mu) / sd).astype(np.float32))).argmax(1).numpy()
    return round(float((np.array(classes)[pred] == val_gold).mean()), 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--features", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    from tqdm import tqdm

    from sdk.train.attribute_heads import photo_split, pooled

    t0 = time.time()
    row, split, train, val = photo_split(args.catalog, args.features)
    colour = lambda p: str(p.record.get("base_colour") or "").strip()  # noqa: E731
    counts = Counter(colour(p) for p in train)
    classes = sorted(c for c, n in counts.items() if n >= 5 and c)
    index = {c: i for i, c in enumerate(classes)}
    train = [p for p in train if colour(p) in index]
    hist = {p.id: colour_histogram(p.image) for p in tqdm([*train, *val], desc="colour histograms", unit="photo")}
    x = pooled(args.features)
    feats = {"tower (pooled EfficientNet-Lite0)": lambda ps: x[[row[p.id] for p in ps]],
             "colour histogram": lambda ps: np.stack([hist[p.id] for p in ps])}
    feats["tower + colour histogram"] = lambda ps: np.concatenate([feats["tower (pooled EfficientNet-Lite0)"](ps),
                                                                    feats["colour histogram"](ps)], 1)
    y = np.array([index[colour(p)] for p in train])
    gold = np.array([colour(p) for p in val])
    results = {name: accuracy(f(train), y, f(val), gold, classes) for name, f in feats.items()}
    report = {"command": "python -m research.colour_features " + " ".join(sys.argv[1:] if argv is None else argv),
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "split": split.summary(), "train_photos": len(train), "validation_photos": len(val),
              "classes": len(classes), "accuracy": results, "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, acc in results.items():
        print(f"{name}: colour accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
