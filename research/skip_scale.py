"""Scale a skip-path embedder's title skip term: how much an unseen category's photo + title
vector gains when the title's linear map weighs more, measured without retraining.

    python -m research.skip_scale .cache/runs/v14_holdout .cache/runs/v14_holdout_t2 --text 2.0

The skip path adds `skip_text(pooled title states)` to the fusion head's output before the L2 norm
(`sdk.train.fusion_model.SkipPath`); multiplying its map and bias by `--text` (and the photo's by
`--image`) changes how much of the frozen towers' own features each vector keeps. A diagnostic
for the validation suite (`python -m sdk.train.evaluate --ood-subject NAME=DST ...`), not a recipe:
a factor read off the held-out category is tuned on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def scale_skip(src: str | Path, dst: str | Path, text: float = 1.0, image: float = 1.0) -> Path:
    """Copy the embedder in `src` to `dst` with its skip maps (weight and bias) scaled.

    Raises:
        ValueError: the embedder has no skip path.
    """
    from sdk.train.fusion_model import load_embedder, save_embedder

    model = load_embedder(src)
    if not model.cfg.skip_path:
        raise ValueError(f"{src}: the embedder has no skip path (EmbedderConfig.skip_path) to scale")
    for skip, factor in ((model.skip_text, text), (model.skip_image, image)):
        skip.proj.weight.data.mul_(factor)
        skip.proj.bias.data.mul_(factor)
    metrics = json.loads((Path(src) / "embedder.json").read_text()).get("metrics", {})
    save_embedder(model, dst, {**metrics, "skip_scaled": {"from": str(src), "text": text, "image": image}})
    return Path(dst)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m research.skip_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--text", type=float, default=1.0, help="factor of the title's skip map")
    ap.add_argument("--image", type=float, default=1.0, help="factor of the photo's skip map")
    args = ap.parse_args(argv)
    print(scale_skip(args.src, args.dst, args.text, args.image))


if __name__ == "__main__":
    main()
