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
import json
from pathlib import Path

import torch

from sdk.train.student import distill_student
from sdk.train.train_config import TrainConfig


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


def distill(teacher_dir: Path, teacher_features: Path, features: Path, catalog, out: Path, cfg: TrainConfig,
            log=print, **options) -> dict:
    """`sdk.train.student.distill_student` (the options are its own), then the student's model card
    (MODEL_CARD.md) beside its weights. Returns the report."""
    report = distill_student(teacher_dir, teacher_features, features, catalog, out, cfg, log=log, **options)
    (out / "MODEL_CARD.md").write_text(model_card(report))
    return report


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
