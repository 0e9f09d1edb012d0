"""Distil the embedder into a smaller, faster student.

The student keeps the teacher's fusion architecture and reads cheaper towers: the first
`--text-layers` of MiniLM's six (layer-drop; titles and traces run through half the encoder) and
photos of `--image-size` pixels instead of 224 (160 px: half of EfficientNet-Lite0's
multiply-adds, a 5x5 map, 25 image tokens instead of 49). Its fusion model starts from the
teacher's weights (the image position table resized to the smaller grid) and is trained on the
catalog with, per view (photo+title, photo+description, photo, title, description):

- cosine distillation: 1 - cos(student vector, teacher vector of the same product and view);
- relational distillation: KL between the teacher's and the student's softmax over in-batch
  similarities, so neighbourhoods (what retrieval sees) survive, not only directions;
- the teacher's own in-batch InfoNCE terms (`sdk.train.train_embedder`), weighted.

    python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features
    python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features_s160_l3 \\
        --image-size 160 --text-layers 3
    python -m sdk.export.distill --catalog ../shared/data/catalog --teacher-features .cache/features \\
        --features .cache/features_s160_l3 --out sdk/train/weights/student
    moon3 build --weights sdk/train/weights/student --out student.engine

`--tune-image-blocks K` / `--tune-text-layers K` also fine-tune the towers' last layers with the
fusion model, from a cache of the frozen layers' output (`--image-mid-blocks K`, `--text-layers`);
they start from the towers' own weights, learn at `--tower-lr-scale` x lr, and are stored with the
student (image_tail.*, text_tail.*) for the build to put into its graphs.

Writes embedder.safetensors (fp16) + embedder.json like any embedder folder, distill_report.json
(student vs teacher on the validation split: recall per task and its ratio, cosine of the student's
vectors to the teacher's per view) and MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdk.train.feature_cache import Features, title_keys
from sdk.train.fusion_model import EmbedderConfig, build_embedder, copy_half, load_embedder
from sdk.train.towers import image_grid
from sdk.train.train_embedder import TrainConfig, evaluate, train
from sdk.train.train_step import view_embeddings

from ..paths import REPO

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


def _shown(path: Path) -> str:
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


def distill(teacher_dir: Path, teacher_features: Path, features: Path, catalog, out: Path, cfg: TrainConfig,
            log=print, init: Path | None = None, fusion_layers: int | None = None,
            tune_text_layers: int | None = None, text_tower: nn.Module | None = None,
            tune_image_blocks: int | None = None, image_tower: nn.Module | None = None) -> dict:
    """Train a student on `features` (a cache made with the student's towers) against the teacher;
    write it to `out` (fp16) with its report and model card. Returns the report.

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
    image_size = int(f_s.meta.get("image_size", 224))
    cached_layers = f_s.text_layers
    teacher = load_embedder(teacher_dir)
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
    try:
        f_s.tune_with(student)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
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
        "teacher": {"weights": _shown(teacher_dir), "image_size": teacher.cfg.image_size,
                    "text_layers": teacher.cfg.text_layers, "fusion_layers": teacher.cfg.n_fusion_layers},
        "train_config": dataclasses.asdict(cfg),
        "seconds": round(time.time() - t0, 1),
        "history": res["history"],
        "out": _shown(out),
        "continued_from": _shown(init) if init else None,
        "init_report": _init_report(init),
        "recall": compare(final, teacher_eval),
        "before_training": {k: before[k] for k in ("text->image R@10", "image->text R@10", "mm->mm R@10",
                                                    "description->mm R@10")},
        "cosine_to_teacher": agreement(student, f_s, teacher, f_t, val_rows),
        "val_items": int(len(val_rows)),
    }
    meta_path = out / "embedder.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {**meta.get("metrics", {}), "distilled_from": _shown(teacher_dir), "final": final}
    meta_path.write_text(json.dumps(meta, indent=2))
    (out / "distill_report.json").write_text(json.dumps(report, indent=2))
    (out / "MODEL_CARD.md").write_text(model_card(report))
    log(f"saved {out}: text->image R@10 {final['text->image R@10']} vs teacher {teacher_eval['text->image R@10']}")
    return report


def _init_report(init: Path | None) -> dict | None:
    """What the model card needs of the student this one started from: its own distill report
    (recursively), so the card can list every command of the chain."""
    if init is None or not (Path(init) / "distill_report.json").is_file():
        return None
    r = json.loads((Path(init) / "distill_report.json").read_text())
    return {k: r.get(k) for k in ("student", "train_config", "continued_from", "init_report", "seconds")}


def _chain(r: dict) -> list[dict]:
    """The distillation runs that made a student, first to last."""
    runs = [r]
    while runs[0].get("init_report"):
        runs.insert(0, runs[0]["init_report"])
    if runs[0].get("continued_from"):  # an earlier report without its start: that start used the defaults
        first = runs[0]["student"]
        # (its report was not kept; 21 min is its logged time)
        runs.insert(0, {"student": first, "train_config": {"epochs": 6, "lr": 5e-4, "warmup_steps": None},
                        "seconds": 21 * 60})
    return runs


def _teacher_fusion(r: dict) -> int:
    """The teacher's fusion layers (reports written before they were recorded: the teacher's 2)."""
    return r.get("teacher", {}).get("fusion_layers", 2)


def _fusion(r: dict, st: dict) -> int:
    """A run's fusion layers (reports written before they were recorded: the teacher's)."""
    return st.get("fusion_layers") or _teacher_fusion(r)


def _tuned(st: dict) -> int:
    return int(st.get("text_tuned_layers") or 0)


def _cached_layers(st: dict) -> int:
    """The text layers a run's feature cache ran (the fine-tuned ones run in training)."""
    return st["text_layers"] - _tuned(st)


def _blocks(st: dict) -> int:
    return int(st.get("image_tuned_blocks") or 0)


def _features_tag(st: dict) -> str:
    return f"features_s{st['image_size']}_l{_cached_layers(st)}" + (f"_m{_blocks(st)}" if _blocks(st) else "")


def _text_layers_shown(st: dict) -> str:
    return f"{st['text_layers']} ({_tuned(st)} tuned)" if _tuned(st) else str(st["text_layers"])


def _distill_commands(r: dict) -> str:
    """The feature-cache and distill commands that made this student, every run of its chain."""
    runs = _chain(r)
    lines, seen = [], set()
    for run in runs:
        st = run["student"]
        if _features_tag(st) not in seen:
            seen.add(_features_tag(st))
            lines.append("    python -m sdk.train.features --catalog ../shared/data/catalog "
                         f"--out .cache/{_features_tag(st)} \\\n"
                         f"        --image-size {st['image_size']} --text-layers {_cached_layers(st)}"
                         + (f" --image-mid-blocks {_blocks(st)}" if _blocks(st) else ""))
    for k, run in enumerate(runs):
        st, tc = run["student"], run["train_config"]
        out = r.get("out", "sdk/train/weights/student") if k == len(runs) - 1 else f"runs/student{k + 1}"
        opts = f"--epochs {tc['epochs']} --lr {tc['lr']}"
        if tc.get("warmup_steps") is not None and k:
            opts += f" --warmup-steps {tc['warmup_steps']}"
        if k:
            opts += f" --init runs/student{k}"
        before = _fusion(r, runs[k - 1]["student"]) if k else _teacher_fusion(r)
        if st.get("fusion_layers") and st["fusion_layers"] != before:
            opts += f" --fusion-layers {st['fusion_layers']}"
        if _tuned(st) != (_tuned(runs[k - 1]["student"]) if k else 0):
            opts += f" --tune-text-layers {_tuned(st)}"
        if _blocks(st) != (_blocks(runs[k - 1]["student"]) if k else 0):
            opts += f" --tune-image-blocks {_blocks(st)}"
        tower_lr_scale = tc.get("tower_lr_scale", TrainConfig.tower_lr_scale)
        if (_tuned(st) or _blocks(st)) and tower_lr_scale != TrainConfig.tower_lr_scale:
            opts += f" --tower-lr-scale {tc['tower_lr_scale']}"
        lines.append("    python -m sdk.export.distill --catalog ../shared/data/catalog "
                     "--teacher-features .cache/features \\\n"
                     f"        --features .cache/{_features_tag(st)} --out {out} \\\n        {opts}")
    return "\n".join(lines)


def _runs_table(r: dict) -> str:
    rows = []
    for k, run in enumerate(_chain(r), 1):
        st, tc = run["student"], run["train_config"]
        px = (f"{st['image_size']} ({_blocks(st)} block{'s' if _blocks(st) > 1 else ''} tuned)" if _blocks(st)
              else str(st["image_size"]))
        rows.append(f"| {k} | {px} | {_text_layers_shown(st)} | {_fusion(r, st)} "
                    f"| {tc['epochs']} | {tc['lr']} | {run['seconds'] / 60:.0f} |")
    return "\n".join(rows)


def _tuned_note(st: dict) -> str:
    t = _tuned(st)
    if not t:
        return "; frozen"
    which = f"layer {st['text_layers']}" if t == 1 else f"layers {st['text_layers'] - t + 1}-{st['text_layers']}"
    return (f"; {which} fine-tuned with the fusion model, its weights stored with it under text_tail.*, "
            f"the layers below frozen")


def _tower_lr_note(r: dict) -> str:
    st, tc = r["student"], r["train_config"]
    if not (_tuned(st) or _blocks(st)):
        return ""
    return (f" The fine-tuned tower layers learn at {tc.get('tower_lr_scale', TrainConfig.tower_lr_scale)} x the "
            "rate, from the towers' own weights where the run before did not tune them.")


def _blocks_note(st: dict) -> str:
    k = _blocks(st)
    if not k:
        return "frozen"
    return (f"its last {k} blocks and head convolution fine-tuned with the fusion model, stored with it under "
            f"image_tail.*, the blocks below frozen")


def model_card(r: dict) -> str:
    """The student's model card (markdown) from its distillation report."""
    st, tc = r["student"], r["train_config"]
    rows = "\n".join(f"| {k} | {v['teacher']:.4f} | {v['student']:.4f} | {100 * (v['ratio'] or 0):.1f}% |"
                     for k, v in r["recall"].items() if k.endswith((" R@1", " R@10")))
    cos = "\n".join(f"| {v} | {c['mean']:.4f} | {c['min']:.4f} |" for v, c in r["cosine_to_teacher"].items())
    kept = ", the first fusion layers kept" if _fusion(r, st) != _teacher_fusion(r) else ""
    before = ("the last run (the student it started from)" if r.get("continued_from")
              else "training (the teacher's weights on the cheaper towers)")
    bt = r["before_training"]
    return f"""# moon3 student embedder: model card

A distilled student of the reference embedder (`{r['teacher']['weights']}`): the same fusion architecture
({st['params'] / 1e6:.2f}M trained parameters) over cheaper towers — the first {st['text_layers']} of
all-MiniLM-L6-v2's {r['teacher']['text_layers']} layers (layer-drop{_tuned_note(st)}) and {st['image_size']} px photos into
EfficientNet-Lite0 ({st['n_image_tokens']} image tokens instead of 49; {_blocks_note(st)}), {_fusion(r, st)} of the teacher's
{_teacher_fusion(r)} fusion layers. Weights stored fp16.

## Training
The first run starts from the teacher's fusion weights (image position table resized to the smaller
grid{kept}); each later run starts from the run before it. Every run trains on the
catalog's train split, batch {tc['batch_size']}, AdamW: per view (photo+title, photo+description, photo, title,
description) {tc['distill_cosine']} x (1 - cosine to the teacher's vector) + {tc['distill_relational']} x relational KL
(in-batch similarity distributions, temperature {tc['distill_temperature']}) + {tc['contrastive_weight']} x the teacher's
InfoNCE terms (the first 160 px run did not yet have the description-only view).{_tower_lr_note(r)} On 2 CPU cores:

| run | photo px | text layers | fusion layers | epochs | lr | minutes |
|---|---|---|---|---|---|---|
{_runs_table(r)}

Reproduce:

    python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features
{_distill_commands(r)}
    moon3 build --weights {r.get('out', 'sdk/train/weights/student')} --out student.engine

## Validation ({r['val_items']} held-out products; relevant = same product or same title)

| task (256-d) | teacher | student | student / teacher |
|---|---|---|---|
{rows}

Before {before}:
text->image R@10 {bt['text->image R@10']}, description->mm R@10 {bt.get('description->mm R@10')}.

Cosine of the student's vectors to the teacher's (same product, same view):

| view | mean | min |
|---|---|---|
{cos}

The student lives in its own space: search a catalog embedded with the same engine, never mix its
vectors with the teacher's. Latency and fidelity of its compiled engine: see docs/students.md
in the moon3-sdk repository.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", default=None, help="catalog folder (title groups, article types)")
    ap.add_argument("--teacher", default=None, help="teacher embedder folder (default: the committed weights)")
    ap.add_argument("--teacher-features", default=".cache/features", help="feature cache of the teacher's towers")
    ap.add_argument("--features", required=True, help="feature cache of the student's towers (sdk.train.features "
                                                      "--image-size N --text-layers K)")
    ap.add_argument("--out", required=True, help="folder for the student's embedder.safetensors + embedder.json")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--cosine", type=float, default=1.0, help="weight of 1 - cosine to the teacher")
    ap.add_argument("--relational", type=float, default=1.0, help="weight of the relational KL")
    ap.add_argument("--contrastive", type=float, default=0.5, help="weight of the InfoNCE terms")
    ap.add_argument("--init", default=None, help="start from this student folder instead of the teacher (its photo "
                                                  "size may differ: the position table is resized)")
    ap.add_argument("--fusion-layers", type=int, default=None,
                    help="keep only the first N fusion layers (default: as many as --init, or the teacher)")
    ap.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    ap.add_argument("--tune-text-layers", type=int, default=None,
                    help="fine-tune N MiniLM layers above those --features cached, starting from MiniLM's own "
                         "(default: as many as --init, or 0)")
    ap.add_argument("--tune-image-blocks", type=int, default=None,
                    help="fine-tune the image tower's last K blocks and head convolution, from the map --features "
                         "cached with --image-mid-blocks K (default: as many as --init, or 0)")
    ap.add_argument("--tower-lr-scale", type=float, default=TrainConfig.tower_lr_scale,
                    help="learning rate of the fine-tuned tower layers, as a share of --lr")
    args = ap.parse_args(argv)
    from sdk.train.fusion_model import MAX_IMAGE_TUNED_BLOCKS

    if args.tune_text_layers is not None and args.tune_text_layers < 0:
        ap.error("--tune-text-layers must be >= 0")
    if args.tune_image_blocks is not None and not 0 <= args.tune_image_blocks <= MAX_IMAGE_TUNED_BLOCKS:
        ap.error(f"--tune-image-blocks must be in 0..{MAX_IMAGE_TUNED_BLOCKS}")
    if not 0.0 < args.tower_lr_scale <= 1.0:
        ap.error("--tower-lr-scale must be in (0, 1]")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from sdk.paths import WEIGHTS

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, contrastive_weight=args.contrastive,
                      distill_cosine=args.cosine, distill_relational=args.relational, warmup_steps=args.warmup_steps,
                      tower_lr_scale=args.tower_lr_scale)
    report = distill(Path(args.teacher or WEIGHTS), Path(args.teacher_features), Path(args.features),
                     args.catalog, Path(args.out), cfg, init=Path(args.init) if args.init else None,
                     fusion_layers=args.fusion_layers, tune_text_layers=args.tune_text_layers,
                     tune_image_blocks=args.tune_image_blocks)
    print(json.dumps({k: report[k] for k in ("recall", "cosine_to_teacher")}, indent=2))


if __name__ == "__main__":
    main()
