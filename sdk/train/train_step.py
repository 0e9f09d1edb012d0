"""One training step of the embedder: the run's plan (rows, keys, tower statistics, labels), a
batch's embeddings in every view the configuration trains (`step_views`), and its loss
(`step_loss`: distillation, the contrastive terms, the terms that keep what the towers know, the
supervised and prompt terms). `sdk.train.train_embedder.train` loops over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .feature_cache import (
    Features,
    article_types,
    batch_inputs,
    field_keys,
    labelled_rows,
    pooled_stats,
    standardized,
    title_keys,
    title_stats,
    training_rows,
)
from .fusion_model import EmbedderConfig, masked_mean, matryoshka
from .losses import category_term, distill_terms, info_nce, relational_kl
from .prompts import field_prompts, prompt_term
from .train_config import TrainConfig


@torch.no_grad()
def view_embeddings(model, f: "Features", rows) -> dict[str, torch.Tensor]:
    """The views of rows without augmentation: photo+title, photo+description, photo alone, title
    alone and description alone (what a teacher gives its student as targets)."""
    title = batch_inputs(f, rows, image=True, text="title")
    feats = title[:2]
    img_tok = model.encode_image(*feats)
    return {
        "mm": model(*title, image_tokens=img_tok),
        "mm_detail": model(*batch_inputs(f, rows, image=True, text="detail", image_features=feats), image_tokens=img_tok),
        "image": model(*batch_inputs(f, rows, image=True, text=None, image_features=feats), image_tokens=img_tok),
        "text": model(*batch_inputs(f, rows, image=False, text="title", image_features=feats), image_tokens=img_tok),
        "detail": model(*batch_inputs(f, rows, image=False, text="detail", image_features=feats), image_tokens=img_tok),
    }


@dataclass
class TrainPlan:
    """What a training run reads besides the model: its rows, the per-row keys that tell positives
    apart, the towers' statistics and the supervised and prompt terms' labels."""

    keys: np.ndarray  # one key per design (products sharing a title are not each other's negatives)
    types: np.ndarray  # article type per row: batches are built of groups of one type
    train_rows: np.ndarray
    val_rows: np.ndarray
    cap_keys: np.ndarray | None = None  # (rows, captions): products sharing a caption
    tower_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    text_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    # (weight, whether it applies to the photo + title vectors, label key per row, whether the row
    # has that label) of each supervised term; all apply to the photo-only vectors
    supervised: list = field(default_factory=list)
    prompts: list = field(default_factory=list)


@dataclass
class StepViews:
    """One step's embeddings of its rows, (B, D) each; None where the configuration has no such view."""

    same: torch.Tensor  # (B, B) rows of one design
    has_img: torch.Tensor  # (B,)
    feats: tuple  # (deep, shallow) image features of the rows
    title_states: tuple  # (tokens, mask) of the titles
    mm1: torch.Tensor  # photo + title
    mm2: torch.Tensor  # photo (tokens dropped, maybe a rendition) + description
    img: torch.Tensor  # photo alone (tokens dropped, maybe a rendition)
    txt: torch.Tensor  # title alone
    clean: torch.Tensor | None = None  # the original photo alone
    aug: torch.Tensor | None = None  # a rendition alone
    cap: torch.Tensor | None = None  # a field caption
    same_cap: torch.Tensor | None = None
    traced: list = field(default_factory=list)  # photo+title, title, photo with their traces
    detail: torch.Tensor | None = None  # description alone (distillation only)


def plan_run(cfg: TrainConfig, f: Features, catalog) -> TrainPlan:
    plan = TrainPlan(title_keys(f, catalog), article_types(f, catalog),
                 training_rows(f, catalog, cfg.holdout_master_category), np.flatnonzero(f.is_val))
    if cfg.caption_weight:
        from .augment import CAPTIONS, captions

        plan.cap_keys = np.stack([field_keys(f, catalog, lambda p, c=c: captions(p.record)[c])
                                  for c in range(CAPTIONS)], 1)
    colour = lambda p: p.record.get("base_colour")  # noqa: E731
    for name, w, mm, value in (("category_weight", cfg.category_weight, True, lambda p: p.article_type),
                               ("colour_weight", cfg.colour_weight, True, colour),
                               ("photo_colour_weight", cfg.photo_colour_weight, False, colour)):
        if w:
            if catalog is None:
                raise ValueError(f"{name} needs the catalog (its product fields)")
            plan.supervised.append((w, mm, *labelled_rows(f, catalog, value)))
    if cfg.tower_relational or cfg.mm_relational:
        plan.tower_stats = pooled_stats(f, plan.train_rows)
    if cfg.text_relational or cfg.mm_relational:
        plan.text_stats = title_stats(f, plan.train_rows)
    if cfg.prompt_weight:
        plan.prompts = field_prompts(f, catalog, plan.train_rows, cfg.prompt_fields.split(","))
    return plan


def step_views(model: nn.Module, model_cfg: EmbedderConfig, cfg: TrainConfig, f: Features, rows: np.ndarray,
           plan: TrainPlan, rng: np.random.Generator, distilling: bool) -> StepViews:
    """Embed one batch's rows in every view the configuration trains (the random draws in a fixed order)."""
    rows_t = torch.as_tensor(rows)
    keys = plan.keys
    same = torch.as_tensor(keys[rows][:, None] == keys[rows][None, :])
    has_img = f.has_image[rows_t].bool()
    keep = (torch.rand(len(rows), model_cfg.n_image_tokens) >= cfg.image_token_drop).float()
    title = batch_inputs(f, rows, image=True, text="title")
    feats = title[:2]  # (deep, shallow), gathered once for the four views
    with torch.set_grad_enabled(not cfg.freeze_image):
        img_tok = model.encode_image(*feats)  # shared by the views with a photo
    # a blended model's photo + title views blend in their own photo-only and text-only views, made
    # first; without a blend the views keep the order (and random draws) of earlier recipes
    blending = hasattr(model_cfg, "blend_weights") and any(model_cfg.blend_weights())
    e_mm1 = None if blending else model(*title, image_tokens=img_tok)
    img_only = batch_inputs(f, rows, image=True, text=None, image_features=feats)
    view_tok, e_aug, view_pooled = img_tok, None, None
    if cfg.uses_renditions:
        # a cached rendition of each photo: the description and photo-only views read it
        # at rendition_prob, and its photo-only vector must find its original's
        pick = rng.integers(0, f.renditions, len(rows))
        aug_deep = torch.from_numpy(f.deep_aug[rows, pick].astype(np.float32))
        aug_tok = model.encode_image(aug_deep, torch.from_numpy(f.shallow_aug[rows, pick].astype(np.float32)))
        use = (torch.rand(len(rows)) < cfg.rendition_prob)[:, None, None]
        view_tok = torch.where(use, aug_tok, img_tok)
        # the skip path reads the pooled features of the photo each view shows
        aug_pooled = aug_deep.mean(1)
        view_pooled = torch.where(use[:, 0], aug_pooled, feats[0].mean(1))
        if cfg.image_instance:
            e_aug = model(*img_only, image_tokens=aug_tok, image_pooled=aug_pooled)
    e_clean = (model(*img_only, image_tokens=img_tok) if (e_aug is not None or cfg.tower_relational or blending)
               else None)
    detail = batch_inputs(f, rows, image=True, text="detail", image_features=feats)
    title_states, detail_states = title[2:4], detail[2:4]  # (tokens, mask): one tail pass each

    def text_alone(text: str, states: tuple) -> torch.Tensor:
        return model(*batch_inputs(f, rows, image=False, text=text, image_features=feats, text_states=states),
                     image_tokens=img_tok)

    def photo_alone() -> torch.Tensor:
        keep_img = (torch.rand(len(rows), model_cfg.n_image_tokens) >= cfg.image_token_drop).float()
        return model(*img_only, image_keep=keep_img, image_tokens=view_tok, image_pooled=view_pooled)

    e_txt = e_det = None
    if blending:
        e_txt = text_alone("title", title_states)
        e_mm1 = model(*title, image_tokens=img_tok, parts=(e_clean, e_txt))
        e_img, e_det = photo_alone(), text_alone("detail", detail_states)
        e_mm2 = model(*detail, image_keep=keep, image_tokens=view_tok, image_pooled=view_pooled, parts=(e_img, e_det))
    else:
        e_mm2 = model(*detail, image_keep=keep, image_tokens=view_tok, image_pooled=view_pooled)
        e_img = photo_alone()
    v = StepViews(same, has_img, feats, title_states, e_mm1, e_mm2, e_img, None, e_clean, e_aug)
    if cfg.caption_weight:
        c = rng.integers(0, plan.cap_keys.shape[1], len(rows))
        cap = (torch.from_numpy(f.caption[rows, c].astype(np.float32)),
               torch.from_numpy(f.caption_mask[rows, c].astype(np.float32)))
        t = int(cap[1].sum(1).max().clamp(min=1))
        v.cap = model(*batch_inputs(f, rows, image=False, text="title", image_features=feats,
                                    text_states=(cap[0][:, :t], cap[1][:, :t])), image_tokens=img_tok)
        k = plan.cap_keys[rows, c]
        v.same_cap = same | torch.as_tensor(k[:, None] == k[None, :])
    v.txt = e_txt if e_txt is not None else text_alone("title", title_states)
    if f.traces:
        for view, image, text in (("photo+title", True, "title"), ("title", False, "title"), ("photo", True, None)):
            keep = (torch.rand(len(rows)) >= cfg.trace_drop).float()
            inputs = batch_inputs(f, rows, image=image, text=text, image_features=feats, trace=view, trace_keep=keep,
                                  text_states=title_states if text else None)
            v.traced.append(model(*inputs, image_tokens=img_tok))
    if distilling:
        # the description-only view is not among the contrastive terms; a student whose text
        # tower lost layers must still learn where descriptions land
        v.detail = e_det if e_det is not None else text_alone("detail", detail_states)
    return v


def contrastive(v: StepViews, cfg: TrainConfig, dims: tuple[int, ...]) -> torch.Tensor:
    """The InfoNCE terms of the views, averaged over the Matryoshka prefixes."""
    scale, same, has_img = 1.0 / cfg.temperature, v.same, v.has_img
    all_ok = torch.ones(len(same), dtype=torch.bool)
    total = 0.0
    for d in dims:
        mm1, mm2, im, tx = (matryoshka(e, d) for e in (v.mm1, v.mm2, v.img, v.txt))
        total = total + (
            info_nce(tx, mm1, same, all_ok, all_ok, scale)
            + info_nce(im, mm1, same, has_img, all_ok, scale)
            + info_nce(mm1, mm2, same, all_ok, all_ok, scale)
            + cfg.cross_modal_weight * info_nce(im, tx, same, has_img, all_ok, scale)
        ) / len(dims)
        if v.aug is not None:
            total = total + cfg.image_instance * info_nce(
                matryoshka(v.aug, d), matryoshka(v.clean, d), same, has_img, has_img, scale) / len(dims)
        if v.cap is not None:
            cp = matryoshka(v.cap, d)
            total = total + cfg.caption_weight * (
                info_nce(cp, mm1, v.same_cap, all_ok, all_ok, scale)
                + info_nce(cp, im, v.same_cap, all_ok, has_img, scale)
            ) / len(dims)
        if v.traced:
            mm_t, tx_t, im_t = (matryoshka(e, d) for e in v.traced)
            total = total + (
                info_nce(tx_t, mm_t, same, all_ok, all_ok, scale)
                + info_nce(im_t, mm_t, same, has_img, all_ok, scale)
                + info_nce(mm_t, mm2, same, all_ok, all_ok, scale)
                + info_nce(tx_t, mm1, same, all_ok, all_ok, scale)
                + info_nce(im_t, tx_t, same, has_img, all_ok, scale)
            ) / len(dims)
    return total


def distillation(v: StepViews, cfg: TrainConfig, teacher: tuple[nn.Module, Features], rows: np.ndarray) -> torch.Tensor:
    t_views = view_embeddings(teacher[0], teacher[1], rows)
    all_ok = torch.ones(len(rows), dtype=torch.bool)
    views = (("mm", v.mm1, all_ok), ("mm_detail", v.mm2, all_ok), ("image", v.img, v.has_img),
             ("text", v.txt, all_ok), ("detail", v.detail, all_ok))
    loss = 0.0
    for name, e, valid in views:
        cos, rel = distill_terms(e, t_views[name], valid, cfg.distill_temperature)
        loss = loss + (cfg.distill_cosine * cos + cfg.distill_relational * rel) / len(views)
    return loss


def step_loss(model: nn.Module, v: StepViews, cfg: TrainConfig, plan: TrainPlan, rows: np.ndarray, dims: tuple[int, ...],
          teacher: tuple[nn.Module, Features] | None) -> torch.Tensor:
    """The step's loss: distillation (with a teacher), the contrastive terms, then the terms that keep
    what the towers know (relational), the supervised and prompt terms."""
    loss = 0.0 if teacher is None else distillation(v, cfg, teacher, rows)
    loss = loss + cfg.contrastive_weight * contrastive(v, cfg, dims)
    has_img = v.has_img
    rel = lambda e, ref: relational_kl(e, ref, cfg.temperature, cfg.tower_temperature)  # noqa: E731
    ref_img = standardized(v.feats[0][has_img].mean(1), plan.tower_stats) if plan.tower_stats is not None else None
    ref_txt = standardized(masked_mean(*v.title_states), plan.text_stats) if plan.text_stats is not None else None
    if cfg.tower_relational and has_img.sum() > 1:
        loss = loss + cfg.tower_relational * rel(v.clean[has_img], ref_img)
    if cfg.text_relational:
        loss = loss + cfg.text_relational * rel(v.txt, ref_txt)
    for w, mm, labels, known in plan.supervised:
        sc, k = 1.0 / cfg.category_temperature, torch.as_tensor(known[rows])
        photo = category_term(v.img, labels[rows], k & has_img, sc)
        loss = loss + w * (0.5 * (category_term(v.mm1, labels[rows], k, sc) + photo) if mm else photo)
    if plan.prompts:
        loss = loss + cfg.prompt_weight * prompt_term(model, plan.prompts, v.img, rows, has_img, 1.0 / cfg.temperature)
    if cfg.mm_relational and has_img.sum() > 1:
        ref_mm = torch.cat([ref_img, ref_txt[has_img]], -1) * math.sqrt(0.5)
        loss = loss + cfg.mm_relational * rel(v.mm1[has_img], ref_mm)
    return loss
