"""Photo + title vectors that keep each modality's own vector: the fused vector plus the photo-only
and title-only vectors of the same embedder, measured without retraining.

    python -m research.late_fusion --catalog ../shared/data/catalog --features .cache/features \\
        --embedder v14=.cache/runs/v14_fp16 --ood-embedder v14=.cache/runs/v14_holdout --beta 0.5 1 \\
        --families catalog knn mm_rendition ood --out docs/results/late_fusion.json

A linear probe's photo + title vector is the normalised sum of its photo and title unit vectors,
so a title query meets its own title vector inside every catalog item, and a photo query its photo
vector. A fusion embedder's photo + title vector is one fused output. `LateFusion` wraps an
embedder so that an item with both a photo and a title is embedded as

    normalise( fused + beta * (photo-only + title-only) )        (all three unit vectors)

and every single-modality item as before (`--title-beta b`: normalise(fused + b * title-only), the
photo-only vector left out); cross-modal, renditions and zero-shot do not change;
the families that read photo + title vectors (catalog search, kNN, thumbnail + title, and the
held-out category's kNN) are scored for each beta beside the embedder itself (beta 0) and the
suite's probe, in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


class LateFusion:
    """A suite subject: `base`'s vectors, its photo + title ones blended with its single-modality ones."""

    def __init__(self, base, beta: float, title_beta: float | None = None):
        """Photo + title items get normalise(fused + beta * photo-only + title_beta * title-only);
        title_beta defaults to beta."""
        self.base, self.beta = base, float(beta)
        self.title_beta = self.beta if title_beta is None else float(title_beta)

    def __getattr__(self, name):  # the suite shares its memoised image tower through these
        return getattr(self.base, name)

    def embed(self, images=None, texts=None) -> np.ndarray:
        out = np.asarray(self.base.embed(images=images, texts=texts), np.float32)
        if images is None or texts is None or not (self.beta or self.title_beta):
            return out
        both = [i for i, (im, t) in enumerate(zip(images, texts)) if im is not None and t is not None]
        if both:
            mixed = out[both] + self.title_beta * np.asarray(self.base.embed(texts=[texts[i] for i in both]), np.float32)
            if self.beta:
                mixed += self.beta * np.asarray(self.base.embed(images=[images[i] for i in both]), np.float32)
            out[both] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m research.late_fusion", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--features", default=None, help="feature cache of the catalog (the probe's features)")
    ap.add_argument("--embedder", action="append", default=[], metavar="NAME=PATH", help="an embedder to blend")
    ap.add_argument("--ood-embedder", action="append", default=[], metavar="NAME=PATH",
                    help="its held-out twin (the ood family), under the same NAME")
    ap.add_argument("--beta", type=float, nargs="+", default=[0.5, 1.0], help="weights of the single-modality vectors")
    ap.add_argument("--title-beta", type=float, nargs="*", default=[],
                    help="weights of the title-only vector alone (the photo-only one left out)")
    ap.add_argument("--blend", nargs="*", default=[], metavar="PHOTO:TITLE",
                    help="separate weights of the photo-only and the title-only vector, e.g. 0.5:1.5")
    ap.add_argument("--families", nargs="+", default=["catalog", "knn", "mm_rendition", "ood"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch

    from sdk.train.evaluate import SuiteConfig, load_subject, named_paths, run_suite

    torch.set_num_threads(args.threads)

    def blends(paths: dict[str, str]) -> dict:
        out = {}
        for name, path in paths.items():
            base = load_subject(path, threads=args.threads)
            out[name] = base
            out.update({f"{name}_beta{b:g}": LateFusion(base, b) for b in args.beta if b})
            out.update({f"{name}_title{b:g}": LateFusion(base, 0.0, b) for b in args.title_beta if b})
            for spec in args.blend:
                bp, bt = (float(x) for x in spec.split(":"))
                out[f"{name}_p{bp:g}_t{bt:g}"] = LateFusion(base, bp, bt)
        return out

    paths, ood_paths = named_paths(args.embedder, "--embedder"), named_paths(args.ood_embedder, "--ood-embedder")
    report = run_suite(args.catalog, blends(paths), ood_subjects=blends(ood_paths),
                       cfg=SuiteConfig(families=tuple(args.families)), features=args.features)
    report["command"] = "python -m research.late_fusion " + " ".join(sys.argv[1:] if argv is None else argv)
    report["subjects"] = {**paths, **{f"{n} (held out)": p for n, p in ood_paths.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    from sdk.train.suite_report import render_markdown

    print(render_markdown(report))


if __name__ == "__main__":
    main()
