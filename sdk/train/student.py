"""Distil the embedder into a smaller, faster student (the training; `python -m sdk.export.distill`
is the command, see its help): the student keeps the teacher's fusion architecture, reads cheaper
towers, starts from the teacher's weights and learns from the teacher's vectors of every view.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdk.paths import REPO

from .feature_cache import Features, pooled_stats, title_keys, title_stats, training_rows
from .fusion_model import EmbedderConfig, build_embedder, copy_half, load_embedder
from .towers import image_grid
from .train_config import TrainConfig
from .train_embedder import evaluate, train
from .train_step import view_embeddings

#: what a student keeps of the teacher's towers by default
DEFAULT_IMAGE_SIZE = 160
DEFAULT_TEXT_LAYERS = 3


def student_config(teacher: EmbedderConfig, image_size: int, text_layers: int,
                   fusion_layers: int | None = None, tuned_text_layers: int = 0) -> EmbedderConfig:
    """The teacher's fusion architecture over cheaper towers; `fusion_layers` (default: the
    teacher's) keeps only the first fusion layers of the head; the last `tuned_text_layers` of
    the `text_layers` are fine-tuned with it."""
    grid = image_grid(image_size)
    fusion = teacher.n_fusion_layers if fusion_layers is None else fusion_layers
    if isinstance(fusion, bool) or not isinstance(fusion, int) or not 1 <= fusion <= teacher.n_fusion_layers:
        raise ValueError(f"fusion_layers must be an int in 1..{teacher.n_fusion_layers} (the teacher's), got {fusion!r}")
    return dataclasses.replace(teacher, image_size=image_size, text_layers=text_layers, n_image_tokens=grid * grid,
                               n_fusion_layers=fusion, text_tuned_layers=tuned_text_layers)


def stale_tails(how: dict[str, str], source: EmbedderConfig, student: EmbedderConfig) -> list[str]:
    """Mark as fresh the student's tuned tower layers that `init_from_teacher` copied from a start
    whose tuned layers sit at other depths (their names number the tuned layers, not the tower's,
    so same-shaped layers would be copied to the wrong depth). Returns what was reset."""
    out = []
    spans = (("text_tail.", "text layers", lambda c: (c.text_tuned_first, c.text_tuned_layers)),
             ("image_tail.", "image blocks", lambda c: (c.image_tuned_first, c.image_tuned_blocks)))
    for prefix, what, span in spans:
        mine = [k for k in how if k.startswith(prefix)]
        if mine and span(source)[1] and span(source) != span(student):
            for k in mine:
                how[k] = "fresh"
            out.append(what)
    return out


def init_image_tail(student: nn.Module, how: dict[str, str], tower: nn.Module | None = None) -> list[str]:
    """Start the student's fine-tuned image blocks that `init_from_teacher` left fresh from the
    image tower's own (`tower`, an `ImageTower`; default EfficientNet-Lite0). Returns the names
    it set."""
    fresh = [k for k, v in how.items() if k.startswith("image_tail.") and v == "fresh"]
    if not fresh:
        return []
    from sdk.train.towers import load_image_tower, tuned_pairs

    tower = tower if tower is not None else load_image_tower(image_size=student.cfg.image_size)
    for trained, tower_module in tuned_pairs(student, image=tower):
        trained.load_state_dict(tower_module.state_dict())
    for k in fresh:
        how[k] = "image tower"
    return fresh


def init_text_tail(student: nn.Module, how: dict[str, str], tower: nn.Module | None = None) -> list[str]:
    """Start the student's fine-tuned text layers that `init_from_teacher` left fresh from the text
    tower's own layers at the same depth (layer-drop; `tower` defaults to MiniLM). Returns the
    names it set."""
    fresh = [k for k, v in how.items() if k.startswith("text_tail.") and v == "fresh"]
    if not fresh:
        return []
    from sdk.train.towers import load_text_tower, tuned_pairs

    first = student.cfg.text_tuned_first
    tower = tower if tower is not None else load_text_tower(layers=student.cfg.text_layers)
    for trained, tower_module in tuned_pairs(student, text=tower):
        trained.load_state_dict(tower_module.state_dict())
    for k in fresh:
        how[k] = f"text tower layer {first + int(k.split('.')[1]) + 1}"
    return fresh


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """Copy the teacher's weights into the student where names and shapes allow (a student with
    fewer fusion layers gets the teacher's first ones); the image position table is resized
    (bilinear over the token grid). Returns {parameter: how it was initialised}."""
    src = teacher.state_dict()
    out, how = {}, {}
    for name, p in student.state_dict().items():
        t = src.get(name)
        if t is not None and t.shape == p.shape:
            out[name], how[name] = t.clone(), "copied"
        elif t is not None and t.dim() == 3 and t.shape[0] == 1 and t.shape[2] == p.shape[2] and _square(t.shape[1]) \
                and _square(p.shape[1]):
            g_t, g_s = _square(t.shape[1]), _square(p.shape[1])
            grid = t[0].T.reshape(1, t.shape[2], g_t, g_t)
            out[name] = F.interpolate(grid, size=(g_s, g_s), mode="bilinear", align_corners=True).reshape(
                t.shape[2], g_s * g_s).T[None].contiguous()
            how[name] = f"resized {g_t}x{g_t} -> {g_s}x{g_s}"
        else:
            out[name], how[name] = p, "fresh"
    student.load_state_dict(out)
    return how


def shown_path(path: Path) -> str:
    """A path as the model card shows it: relative to the repository when inside it."""
    root = REPO
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def _square(n: int) -> int:
    r = int(round(n ** 0.5))
    return r if r * r == n and r > 1 else 0


@torch.no_grad()
def agreement(student: nn.Module, f_s: Features, teacher: nn.Module, f_t: Features, rows: np.ndarray,
              bs: int = 256) -> dict[str, dict[str, float]]:
    """Cosine of the student's vectors to the teacher's, per view, over rows (products without a
    photo are left out of the photo views)."""
    student.eval()
    teacher.eval()
    sims: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(rows), bs):
        r = rows[i:i + bs]
        has = f_s.has_image[torch.as_tensor(r)].numpy().astype(bool)
        s, t = view_embeddings(student, f_s, r), view_embeddings(teacher, f_t, r)
        for view in s:
            c = (s[view] * t[view]).sum(-1).numpy()
            sims.setdefault(view, []).append(c if view == "text" else c[has])
    return {v: {"mean": round(float(np.concatenate(c).mean()), 4), "min": round(float(np.concatenate(c).min()), 4)}
            for v, c in sims.items()}


def compare(student_metrics: dict, teacher_metrics: dict) -> dict[str, dict[str, float]]:
    """Per recall metric: teacher, student and the student's share of the teacher."""
    return {k: {"teacher": teacher_metrics[k], "student": v,
                "ratio": round(v / teacher_metrics[k], 4) if teacher_metrics[k] else None}
            for k, v in student_metrics.items() if k in teacher_metrics}


def _start_student(teacher: nn.Module, f_s: Features, features: Path, init: Path | None, fusion_layers: int | None,
                   tune_text_layers: int | None, tune_image_blocks: int | None, text_tower: nn.Module | None,
                   image_tower: nn.Module | None, log) -> tuple[nn.Module, EmbedderConfig]:
    """The student before training: its config (from the features' towers and the tuning asked for,
    defaults from `init`) and its weights (from `init` or the teacher, tuned tower layers from the
    towers)."""
    image_size = int(f_s.meta.get("image_size", 224))
    cached_layers = f_s.text_layers
    source = teacher if init is None else load_embedder(init)
    if init is not None and fusion_layers is None:
        fusion_layers = source.cfg.n_fusion_layers
    if tune_text_layers is None:
        tune_text_layers = source.cfg.text_tuned_layers if init is not None else 0
    if tune_image_blocks is None:
        tune_image_blocks = source.cfg.image_tuned_blocks if init is not None else 0
    text_layers = cached_layers + tune_text_layers
    if text_layers > teacher.cfg.text_layers:
        raise SystemExit(f"{features} caches the states after {cached_layers} text layers: {tune_text_layers} more "
                         f"would pass the teacher's {teacher.cfg.text_layers}")
    s_cfg = dataclasses.replace(student_config(teacher.cfg, image_size, text_layers, fusion_layers, tune_text_layers),
                                image_tuned_blocks=tune_image_blocks)
    if f_s.deep.shape[1] != s_cfg.n_image_tokens:
        raise SystemExit(f"{features} holds {f_s.deep.shape[1]} image tokens per photo, {image_size} px gives "
                         f"{s_cfg.n_image_tokens}")
    student = build_embedder(s_cfg)
    how = init_from_teacher(student, source)
    for dropped in stale_tails(how, source.cfg, s_cfg):
        log(f"the start's fine-tuned {dropped} sit at other depths than this student's: they start from the tower")
    from_towers = init_text_tail(student, how, text_tower) + init_image_tail(student, how, image_tower)
    resized = [k for k, v in how.items() if v.startswith("resized")]
    fresh = [k for k, v in how.items() if v == "fresh"]
    log(f"student: {image_size} px photos ({s_cfg.n_image_tokens} tokens, last {tune_image_blocks} image blocks "
        f"fine-tuned), {text_layers} text layers ({tune_text_layers} fine-tuned), {s_cfg.n_fusion_layers} fusion "
        f"layers, from {'the teacher' if init is None else init}: {sum(v == 'copied' for v in how.values())} tensors "
        f"copied, resized: {resized}, from the towers: {len(from_towers)}, fresh: {len(fresh)}")
    return student, s_cfg


def refit_skip_stats(student: nn.Module, f_s: Features, log=print) -> None:
    """A skip path standardises the mean-pooled tower features by the training set's statistics:
    those the student starts with describe its start's towers (the teacher's six text layers and
    224-px photos), not its own, and on other towers they blow the skip term up by orders of
    magnitude. Refit them on the student's own features (training rows); its skip maps then train
    from inputs of unit scale."""
    if not getattr(student.cfg, "skip_path", False):
        return
    train_rows = training_rows(f_s, None)
    student.skip_image.set_stats(*pooled_stats(f_s, train_rows))
    student.skip_text.set_stats(*title_stats(f_s, train_rows))
    log(f"skip path: standardisation refitted on the student's towers ({len(train_rows)} training products)")


def distill_student(teacher_dir: Path, teacher_features: Path, features: Path, catalog, out: Path, cfg: TrainConfig,
                    log=print, init: Path | None = None, fusion_layers: int | None = None,
                    tune_text_layers: int | None = None, text_tower: nn.Module | None = None,
                    tune_image_blocks: int | None = None, image_tower: nn.Module | None = None) -> dict:
    """Train a student on `features` (a cache made with the student's towers) against the teacher;
    write it to `out` (fp16) with its report (distill_report.json). Returns the report.

    `init`: start from an earlier student instead of the teacher's weights (its towers may differ:
    the position table is resized as from the teacher). `fusion_layers`: keep only the first
    fusion layers (default: as many as `init`, or the teacher). `tune_text_layers`: fine-tune
    that many MiniLM layers above the ones `features` cached (default: as many as `init`, or 0);
    they start from the text tower's own (`text_tower`, default MiniLM). `tune_image_blocks`:
    fine-tune the image tower's last blocks and head convolution from the map `features` cached
    (`--image-mid-blocks`; default: as many as `init`, or 0), from the image tower's own weights
    (`image_tower`, default EfficientNet-Lite0).
    """
    f_t, f_s = Features(teacher_features), Features(features)
    if not np.array_equal(f_t.ids, f_s.ids):
        raise SystemExit(f"{features} and {teacher_features} hold other products; build both from one catalog")
    teacher = load_embedder(teacher_dir)
    student, s_cfg = _start_student(teacher, f_s, features, init, fusion_layers, tune_text_layers, tune_image_blocks,
                                    text_tower, image_tower, log)
    image_size, text_layers = s_cfg.image_size, s_cfg.text_layers
    tune_text_layers, tune_image_blocks = s_cfg.text_tuned_layers, s_cfg.image_tuned_blocks
    try:
        f_s.tune_with(student)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    refit_skip_stats(student, f_s, log)
    catalog = catalog or f_s.meta.get("catalog")
    keys = title_keys(f_s, catalog)
    val_rows = np.flatnonzero(f_s.is_val)
    teacher_eval = evaluate(teacher, f_t, val_rows, keys, dims=teacher.cfg.matryoshka_dims)
    before = evaluate(student, f_s, val_rows, keys)
    log(f"teacher R@10 text->image {teacher_eval['text->image R@10']}; student before training {before['text->image R@10']}")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="moon3-distill-") as tmp:
        res = train(s_cfg, cfg, f_s, catalog, Path(tmp), log=log, init=student, teacher=(teacher, f_t))
        out.mkdir(parents=True, exist_ok=True)
        copy_half(tmp, out)
    student = load_embedder(out)  # what ships: the fp16 weights, loaded back
    f_s.tune_with(student)
    final = evaluate(student, f_s, val_rows, keys, dims=s_cfg.matryoshka_dims)
    report = {
        "student": {"image_size": image_size, "text_layers": text_layers, "n_image_tokens": s_cfg.n_image_tokens,
                    "fusion_layers": s_cfg.n_fusion_layers, "text_tuned_layers": tune_text_layers,
                    "image_tuned_blocks": tune_image_blocks,
                    "params": res["params"]},
        "teacher": {"weights": shown_path(teacher_dir), "image_size": teacher.cfg.image_size,
                    "text_layers": teacher.cfg.text_layers, "fusion_layers": teacher.cfg.n_fusion_layers},
        "train_config": dataclasses.asdict(cfg),
        "seconds": round(time.time() - t0, 1),
        "history": res["history"],
        "out": shown_path(out),
        "continued_from": shown_path(init) if init else None,
        "init_report": start_report(init),
        "recall": compare(final, teacher_eval),
        "before_training": {k: before[k] for k in ("text->image R@10", "image->text R@10", "mm->mm R@10",
                                                    "description->mm R@10")},
        "cosine_to_teacher": agreement(student, f_s, teacher, f_t, val_rows),
        "val_items": int(len(val_rows)),
    }
    meta_path = out / "embedder.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {**meta.get("metrics", {}), "distilled_from": shown_path(teacher_dir), "final": final}
    meta_path.write_text(json.dumps(meta, indent=2))
    (out / "distill_report.json").write_text(json.dumps(report, indent=2))
    log(f"saved {out}: text->image R@10 {final['text->image R@10']} vs teacher {teacher_eval['text->image R@10']}")
    return report


def start_report(init: Path | None) -> dict | None:
    """What the model card needs of the student this one started from: its own distill report
    (recursively), so the card can list every command of the chain."""
    if init is None or not (Path(init) / "distill_report.json").is_file():
        return None
    r = json.loads((Path(init) / "distill_report.json").read_text())
    return {k: r.get(k) for k in ("student", "train_config", "continued_from", "init_report", "seconds")}
