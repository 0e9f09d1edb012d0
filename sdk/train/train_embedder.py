"""Train the reference embedder on cached tower features (see `sdk.train.features`).

    python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features
    python -m sdk.train.train_embedder --features .cache/features --variant full --out sdk/models/embedder

Loss (each term in-batch InfoNCE, symmetric, averaged over the Matryoshka prefixes 64/128/256):
  text -> multimodal, image -> multimodal, multimodal -> multimodal (two views: photo + title vs.
  photo with 30% of its tokens dropped + brand/description), image <-> text; the photo-only view
  also drops 30% of its tokens (another random draw).
With `--traces` (written by `sdk.train.traces`), the reasoner's traces become the third
modality (Think-Then-Embed): the photo+title, title and photo views also appear with the trace
the reasoner wrote from exactly what that view shows, in the terms text+trace -> mm+trace,
image+trace -> mm+trace, mm+trace <-> mm (description view, no trace), text+trace -> mm and
image+trace <-> text+trace; a share of those rows drop the trace, so items with and without a
trace stay in one space. `--init` continues from trained weights.
Batches are built from groups of products of one article type, so in-batch negatives include
hard ones; products that share a title (same design, other colour/size) are masked out of each
other's negatives. Products without a photo take part in the text-only terms.

Views that keep what the towers know (a cache with `sdk.train.features --renditions K`):
`--rendition-prob p` makes a share p of the photo-only and description views read a cached
rendition of the photo (thumbnail, JPEG, crop, grayscale, light); `--image-instance w` adds a
rendition -> original photo term; `--caption-weight w` adds field captions ("Men Blue Tshirts")
-> photo + title and <-> photo terms; `--tower-relational w` keeps the photo vectors' in-batch
similarities those of the frozen image tower's standardised pooled features (KL at
`--tower-temperature`); `--text-relational w` and `--mm-relational w` do the same for the title-only
vectors (against MiniLM's pooled title states) and the photo + title vectors (against both);
`--category-weight w` gathers the photo + title and photo-only vectors of one article type
(supervised contrastive), `--colour-weight w` those of one base colour, `--photo-colour-weight w`
only the photo-only vectors of one base colour (colour stays in what photos say; nearest neighbours
of photo + title vectors stay by type). `--ema-decay d` validates and saves a moving average of the weights.
`--holdout-master-category Footwear` trains without that category (the
validation suite's out-of-domain family). `--checkpoint FILE` saves every epoch and resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .feature_cache import (
    Features,
    embed_rows,
    pooled_stats,
    title_keys,
    title_stats,
    training_rows,
    with_photo,
)
from .fusion_model import EmbedderConfig, build_embedder, config_flags, matryoshka, save_embedder
from .metrics import recall_at_k
from .modality_gap import center_modalities, init_skip_from_probe
from .prompts import PROMPT_FIELDS
from .train_config import TrainConfig
from .train_step import TrainPlan, plan_run, step_loss, step_views


def make_batches(rows: np.ndarray, groups: np.ndarray, cfg: TrainConfig, rng: np.random.Generator):
    """Batches of `batch_size` rows made of `group_size` chunks of one article type."""
    chunks = []
    for g in np.unique(groups):
        members = rows[groups == g]
        rng.shuffle(members)
        chunks += [members[i : i + cfg.group_size] for i in range(0, len(members), cfg.group_size)]
    order = rng.permutation(len(chunks))
    flat = np.concatenate([chunks[i] for i in order])
    return [flat[i : i + cfg.batch_size] for i in range(0, len(flat) - cfg.batch_size + 1, cfg.batch_size)]


def evaluate(model, f: Features, val_rows: np.ndarray, title_key: np.ndarray, dims=(256,)) -> dict:
    """Validation retrieval; relevance = same id or same title (one design)."""
    img_rows = with_photo(f, val_rows)
    e_img = embed_rows(model, f, img_rows, image=True, text=None)
    e_txt_img = embed_rows(model, f, img_rows, image=False, text="title")
    e_txt_all = embed_rows(model, f, val_rows, image=False, text="title")
    e_mm = embed_rows(model, f, img_rows, image=True, text="title")
    e_mm2 = embed_rows(model, f, img_rows, image=True, text="detail", flip=True)
    e_detail = embed_rows(model, f, img_rows, image=False, text="detail")
    k_img, k_all = title_key[img_rows], title_key[val_rows]
    tasks = [
        ("text->image", e_txt_img, e_img, k_img, k_img),
        ("image->text", e_img, e_txt_all, k_img, k_all),
        ("mm->mm", e_mm, e_mm2, k_img, k_img),
        ("description->mm", e_detail, e_mm, k_img, k_img),
    ]
    if f.traces:
        # trace on: every side carries the trace the reasoner wrote from what that side shows
        t_img = embed_rows(model, f, img_rows, image=True, text=None, trace="photo")
        t_txt_img = embed_rows(model, f, img_rows, image=False, text="title", trace="title")
        t_txt_all = embed_rows(model, f, val_rows, image=False, text="title", trace="title")
        t_mm = embed_rows(model, f, img_rows, image=True, text="title", trace="photo+title")
        t_mm2 = embed_rows(model, f, img_rows, image=True, text="detail", flip=True, trace="photo")
        tasks += [
            ("trace text->image", t_txt_img, t_img, k_img, k_img),
            ("trace image->text", t_img, t_txt_all, k_img, k_all),
            ("trace mm->mm", t_mm, t_mm2, k_img, k_img),
            ("trace description->mm", e_detail, t_mm, k_img, k_img),
            # catalog side traced offline, queries without (no reasoning at query time)
            ("catalog-trace text->image", e_txt_img, t_img, k_img, k_img),
            ("catalog-trace mm->mm", e_mm, t_mm2, k_img, k_img),
        ]
    if "oracle" in f.traces:
        # the catalog fields' own trace on both sides: what a reasoner that read them right would give
        o_img = embed_rows(model, f, img_rows, image=True, text=None, trace="oracle")
        o_txt = embed_rows(model, f, img_rows, image=False, text="title", trace="oracle")
        tasks += [("oracle-trace text->image", o_txt, o_img, k_img, k_img)]
    res = {}
    for d in dims:
        m = lambda e: matryoshka(e, d)  # noqa: E731
        sfx = "" if d == max(dims) else f"@{d}d"
        for name, q, g, qk, gk in tasks:
            for key, v in recall_at_k(m(q), m(g), qk, gk).items():
                res[f"{name} {key}{sfx}"] = v
    return res


def param_groups(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """AdamW groups: matrices decay, vectors/positions/queries do not; fine-tuned pretrained tower
    layers (`text_tail.*`, `image_tail.*`) learn at cfg.tower_lr_scale of the rate with a light
    decay; the skip maps (`skip_image.*`, `skip_text.*`) at cfg.skip_lr_scale of it."""
    kind = lambda n: ("tail" if n.startswith(("text_tail.", "image_tail.")) else  # noqa: E731
                      "skip" if n.startswith(("skip_image.", "skip_text.")) else "fusion")
    groups = []
    for k, scale in (("fusion", 1.0), ("tail", cfg.tower_lr_scale), ("skip", cfg.skip_lr_scale)):
        mine = [(n, p) for n, p in named if kind(n) == k]
        tail = k == "tail"
        # the fusion model's position table and query vector do not decay; a tuned layer's
        # matrices (its attention "query" included) all do
        decays = lambda n, p: p.ndim >= 2 and (tail or ("pos" not in n and "query" not in n))  # noqa: E731
        decay = [p for n, p in mine if decays(n, p)]
        rest = [p for n, p in mine if not decays(n, p)]
        for params, wd in ((decay, 0.01 if tail else cfg.weight_decay), (rest, 0.0)):
            if params or k == "fusion":
                groups.append({"params": params, "weight_decay": wd, "lr": cfg.lr * scale})
    return groups


def _check_config(model_cfg: EmbedderConfig, cfg: TrainConfig, f: Features, catalog) -> None:
    if cfg.center_modalities and not getattr(model_cfg, "skip_path", False):
        raise ValueError("center_modalities needs a skip-path model (--skip-path): its skip biases carry the offsets")
    if cfg.uses_renditions and not f.renditions:
        raise ValueError("rendition_prob, image_instance and caption_weight need renditions and captions in the "
                         "feature cache (python -m sdk.train.features ... --renditions K)")
    if cfg.uses_renditions and (model_cfg.image_tuned_blocks or model_cfg.text_tuned_layers):
        raise ValueError("renditions and captions are cached as the whole towers' features; a model that fine-tunes "
                         "tower layers cannot read them")
    if cfg.caption_weight and catalog is None:
        raise ValueError("caption_weight needs the catalog (products that share a caption are not negatives)")


def _model(model_cfg: EmbedderConfig, cfg: TrainConfig, f: Features, catalog, plan: TrainPlan, init: nn.Module | None,
           log) -> nn.Module:
    """The model to train: `init`, or a new one whose skip path (if any) starts as `cfg.skip_init` says;
    frozen parts have requires_grad off."""
    model = build_embedder(model_cfg) if init is None else init
    if init is None and model_cfg.skip_path:
        if cfg.skip_init == "probe":  # the probe's own statistics and maps
            init_skip_from_probe(model, f, catalog, plan.train_rows, plan.keys, log)
        else:
            model.skip_image.set_stats(*(plan.tower_stats or pooled_stats(f, plan.train_rows)))
            model.skip_text.set_stats(*(plan.text_stats or title_stats(f, plan.train_rows)))
    elif cfg.skip_init != "zero":
        raise ValueError("skip_init='probe' needs a new model with a skip path (EmbedderConfig.skip_path, no --init)")
    f.tune_with(model)  # fine-tuned tower layers run over the cache; a model without them reads it as is
    if cfg.freeze_image:
        for p in model.image.parameters():
            p.requires_grad_(False)
    if model_cfg.skip_path and not cfg.skip_lr_scale:
        for p in (*model.skip_image.parameters(), *model.skip_text.parameters()):
            p.requires_grad_(False)
    return model


@dataclass
class _Optimizer:
    named: list  # the trained parameters, by name
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: nn.Module | None  # the weight average that is measured and saved
    steps_per_epoch: int
    total: int


def _optimizer(model: nn.Module, cfg: TrainConfig, n_train: int) -> _Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr)
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n_train} training products are fewer than one batch of {cfg.batch_size}")
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
    )
    # the weight average (a copy of the model, updated after each step) that is measured and saved
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        cfg.ema_decay), use_buffers=True) if cfg.ema_decay else None)
    return _Optimizer(named, opt, sched, ema, steps_per_epoch, total)


def _resume(checkpoint: Path, model_cfg: EmbedderConfig, cfg: TrainConfig, model: nn.Module, o: _Optimizer,
            rng: np.random.Generator) -> tuple[int, list]:
    """Load a run's checkpoint into the model, optimiser, schedule and random states -> (epochs done, history)."""
    state = torch.load(checkpoint, weights_only=False)  # our own training state (never shipped)
    # a field added since the checkpoint was written takes its default (what that run trained with)
    written = {**TrainConfig().__dict__, **state["train_config"]}
    if written != cfg.__dict__ or state["model_config"] != json.loads(model_cfg.to_json()):
        raise ValueError(f"{checkpoint} was written by another configuration; remove it or give the same arguments")
    model.load_state_dict(state["model"])
    if o.ema is not None:
        o.ema.load_state_dict(state["ema"])
    o.opt.load_state_dict(state["optimizer"])
    o.sched.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    rng.bit_generator.state = state["numpy_rng"]
    return state["epoch"], state["history"]


def _save_checkpoint(checkpoint: Path, epoch: int, history: list, model_cfg: EmbedderConfig, cfg: TrainConfig,
                     model: nn.Module, o: _Optimizer, rng: np.random.Generator) -> None:
    Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{checkpoint}.tmp")
    torch.save({"epoch": epoch, "history": history, "model": model.state_dict(), "optimizer": o.opt.state_dict(),
                "schedule": o.sched.state_dict(), "torch_rng": torch.get_rng_state(),
                "ema": None if o.ema is None else o.ema.state_dict(),
                "numpy_rng": rng.bit_generator.state, "train_config": cfg.__dict__,
                "model_config": json.loads(model_cfg.to_json())}, tmp)
    tmp.replace(checkpoint)


def train(model_cfg: EmbedderConfig, cfg: TrainConfig, f: Features, catalog, out: Path | None, log=print,
          init: nn.Module | None = None, teacher: tuple[nn.Module, Features] | None = None,
          checkpoint: Path | None = None) -> dict:
    """Train (or, with `init`, continue training) an embedder; returns the metrics dict.

    With `teacher` (a trained embedder and its own feature cache, rows in the same order as `f`),
    the loss adds cfg.distill_cosine / cfg.distill_relational times the distillation terms of each
    view (`distill_terms`) to cfg.contrastive_weight times the InfoNCE terms.

    With `checkpoint` (a file), the model, optimiser, schedule, random states and history are
    written there after every epoch, and a run that finds one resumes after its last epoch (the
    same configuration must be given; a finished run's checkpoint trains nothing more).
    """
    if teacher is not None:
        if not np.array_equal(teacher[1].ids, f.ids):
            raise ValueError("the teacher's feature cache holds other products (or another order) than the student's")
        teacher[0].eval()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    _check_config(model_cfg, cfg, f, catalog)
    plan = plan_run(cfg, f, catalog)
    model = _model(model_cfg, cfg, f, catalog, plan, init, log)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"variant={model_cfg.variant} params={n_params/1e6:.2f}M train={len(plan.train_rows)} val={len(plan.val_rows)}")
    o = _optimizer(model, cfg, len(plan.train_rows))
    dims = model_cfg.matryoshka_dims
    history: list = []
    t0 = time.time()
    bar = tqdm(total=o.total, desc=f"train {model_cfg.variant}", unit="step")
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start, history = _resume(checkpoint, model_cfg, cfg, model, o, rng)
        bar.update(start * o.steps_per_epoch)
        log(f"resumed from {checkpoint} after epoch {start}")
    for epoch in range(start, cfg.epochs):
        model.train()
        for rows in make_batches(plan.train_rows, plan.types[plan.train_rows], cfg, rng):
            views = step_views(model, model_cfg, cfg, f, rows, plan, rng, distilling=teacher is not None)
            loss = step_loss(model, views, cfg, plan, rows, dims, teacher)
            o.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in o.named], 1.0)
            o.opt.step()
            o.sched.step()
            if o.ema is not None:
                o.ema.update_parameters(model)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = evaluate(model if o.ema is None else o.ema.module, f, plan.val_rows, plan.keys)
        history.append({"epoch": epoch + 1, "loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1),
                        **metrics})
        log(json.dumps(history[-1]))
        if checkpoint is not None:
            _save_checkpoint(checkpoint, epoch + 1, history, model_cfg, cfg, model, o, rng)
    bar.close()
    if o.ema is not None:
        model = o.ema.module  # the average is the trained model
    centering = center_modalities(model, f, plan.train_rows, log=log) if cfg.center_modalities else None
    result = {
        "variant": model_cfg.variant,
        "params": n_params,
        "train_items": int(len(plan.train_rows)),
        "val_items": int(len(plan.val_rows)),
        "seconds": round(time.time() - t0, 1),
        "final": evaluate(model, f, plan.val_rows, plan.keys, dims=dims),
        "fire_scales": {f"fire@{k}": round(m.scale.item(), 4)
                        for k, m in getattr(getattr(model, "image", None), "fire", {}).items()},
        "history": history,
        "train_config": cfg.__dict__,
        "trace_trained": bool(f.traces),
        **({"centering": centering} if centering else {}),
    }
    if out is not None:
        save_embedder(model, out, metrics=result)
        log(f"saved {out}")
    return result


# TrainConfig's view and loss weights, each a `--flag-name` of `main`, with its help
VIEW_FLAGS = {
    "rendition_prob": "share of photo-only and description views whose photo is a cached rendition",
    "image_instance": "weight of the rendition <-> original photo term",
    "caption_weight": "weight of the field-caption terms",
    "tower_relational": "weight of the term keeping photo similarities those of the frozen image tower",
    "tower_temperature": "temperature of the towers' side of the relational terms",
    "text_relational": "weight of the title-only vectors' relational term against MiniLM's pooled title states",
    "mm_relational": "weight of the photo + title vectors' relational term against both towers' pooled features",
    "category_weight": "weight of the supervised contrastive term over article types (photo + title, photo)",
    "category_temperature": "temperature of the article-type and colour terms",
    "colour_weight": "weight of the supervised contrastive term over base colours (photo + title, photo)",
    "photo_colour_weight": "weight of the supervised contrastive term over base colours (photo only)",
    "cross_modal_weight": "weight of the photo-only <-> title-only InfoNCE term",
    "skip_init": "how a skip-path model starts: 'zero' or 'probe' (the suite's linear probe, trained here)",
    "skip_lr_scale": "learning rate of the skip maps as a share of --lr (0: they stay as they start)",
    "prompt_weight": "weight of the term where each photo picks its type, colour and gender among class prompts",
    "prompt_fields": f"comma-separated fields of the prompt term, of {','.join(PROMPT_FIELDS)}",
    "ema_decay": "decay per step of the weight average that is validated and saved (0: off)",
    "center_modalities": "after training, centre the photo-only and title-only vectors (a skip-path model)",
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default=".cache/features", help="feature cache from sdk.train.features")
    ap.add_argument("--catalog", default=None, help="catalog folder (for title groups and article types)")
    ap.add_argument("--variant", choices=("full", "no_fire", "linear"), default="full")
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--traces", default=None, help="trace cache from sdk.train.traces: train the trace modality")
    ap.add_argument("--init", default=None, help="continue from this embedder folder (embedder.json + .safetensors)")
    ap.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    ap.add_argument("--freeze-image", action="store_true", help="keep the image encoder fixed (with --init)")
    ap.add_argument("--trace-views", nargs="+", default=["photo+title", "title", "photo"],
                    help="trace views to load (add 'oracle' to also measure the catalog fields' own traces)")
    ap.add_argument("--eval-only", action="store_true", help="only measure the --init embedder on the validation split")
    ap.add_argument("--center-only", action="store_true",
                    help="close the --init embedder's modality gap (center_modalities), measure it, save it to --out")
    ap.add_argument("--skip-path", action="store_true",
                    help="add linear maps of the towers' pooled features to the output (EmbedderConfig.skip_path)")
    ap.add_argument("--title-weight-with-photo", type=float, default=None, metavar="W",
                    help="train with the title's skip term weighing W in photo + title vectors "
                         "(EmbedderConfig.title_weight_with_photo; needs --skip-path; default 1)")
    ap.add_argument("--modality-blend", type=float, default=None, metavar="B",
                    help="train photo + title vectors as normalise(fused + B * (photo-only + title-only)) "
                         "(EmbedderConfig.modality_blend; default 0: the fused vector alone)")
    ap.add_argument("--title-blend", type=float, default=None, metavar="T",
                    help="the title-only vector's weight in that blend, when it differs from B "
                         "(EmbedderConfig.title_blend; default: B)")
    for name, text in VIEW_FLAGS.items():
        default = getattr(TrainConfig, name)
        if isinstance(default, bool):
            ap.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=text)
        else:
            ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=text)
    ap.add_argument("--holdout-master-category", default=None, metavar="NAME",
                    help="train without this master category (the validation suite's ood family)")
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--checkpoint", default=None, help="checkpoint file: written every epoch, resumed from when present")
    ap.add_argument("--out", default=None, help="folder to write embedder.safetensors + embedder.json")
    ap.add_argument("--report", default=None, help="also write the metrics JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    f = Features(args.features)
    catalog = args.catalog or f.meta.get("catalog")
    if args.traces:
        f.load_traces(args.traces, views=args.trace_views)
    init = None
    if args.init:
        from .fusion_model import load_embedder

        init = load_embedder(args.init)
    if args.eval_only or args.center_only:  # no training: measure (and centre) the --init embedder
        if init is None or (args.center_only and not args.out):
            raise SystemExit("--eval-only needs --init" if args.eval_only else "--center-only needs --init and --out")
        f.tune_with(init)
        res = {}
        if args.center_only:
            centering = center_modalities(init, f, training_rows(f, catalog, args.holdout_master_category))
            res = {**json.loads((Path(args.init) / "embedder.json").read_text()).get("metrics", {}),
                   "centering": centering, "centered_from": str(args.init)}
        res["final"] = evaluate(init, f, np.flatnonzero(f.is_val), title_keys(f, catalog), dims=init.cfg.matryoshka_dims)
        if args.center_only:
            save_embedder(init, args.out, metrics=res)
    else:
        res = _train_from_args(args, ap, init, f, catalog)
    print(json.dumps(res["final"], indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(res, indent=2))


def _train_from_args(args, ap, init, f: Features, catalog) -> dict:
    """`train` with the command line's configuration (a bad one exits with the reason)."""
    try:
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                          freeze_image=args.freeze_image, holdout_master_category=args.holdout_master_category,
                          seed=args.seed, **{name: getattr(args, name) for name in VIEW_FLAGS})
        arch = config_flags(args)
        if init is not None and arch:
            raise ValueError(f"--{next(iter(arch)).replace('_', '-')} sets a new model's config; with --init the model "
                             "keeps its own (python -m sdk.train.fusion_model SRC DST changes a copy's)")
        model_cfg = init.cfg if init is not None else EmbedderConfig(variant=args.variant, skip_path=args.skip_path,
                                                                     **arch)
    except ValueError as exc:
        ap.error(str(exc))
    return train(
        model_cfg,
        cfg,
        f,
        catalog,
        Path(args.out) if args.out else None,
        log=tqdm.write,
        init=init,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
    )


if __name__ == "__main__":
    main()
