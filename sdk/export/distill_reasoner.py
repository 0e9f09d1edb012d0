"""Distil the reasoner into a student with fewer decoder layers.

The student keeps the teacher's tokenizer, width, resampler and PUMGPT adapters and drops decoder
layers (`--layers 0,3` keeps the teacher's first and last of four, initialised from them). It is
trained on the catalog's tasks (`sdk.train.train_reasoner`) with

- token-level distillation: (1 - kd) x cross-entropy + kd x T^2 x KL(teacher || student) over
  the answer tokens, the teacher's logits computed on the same batch;
- sequence-level distillation: with `--traces` (a cache from `sdk.train.traces`, written by the
  teacher), the trace task learns the teacher's own greedy traces for what the example shows
  (photo+title, title or photo) instead of the catalog-built target.

    python -m sdk.train.traces --catalog ../shared/data/catalog --features .cache/features --out .cache/traces
    python -m sdk.export.distill_reasoner --catalog ../shared/data/catalog --features .cache/features \\
        --traces .cache/traces --out runs/reasoner_student
    moon3 build --reasoner runs/reasoner_student --out student-reasoner.engine

Writes the student like any reasoner folder (`load_reasoner`), its model card and
distill_report.json: the validation metrics of student and teacher side by side and the greedy
decoding speed of both in PyTorch, measured in the same process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from sdk.train.reasoner_model import TASKS, Reasoner, encode_example, load_reasoner
from sdk.train.train_reasoner import TrainConfig, train

from ..paths import REASONER_WEIGHTS

METRICS = ("category_acc_photo", "category_acc_title", "attribute_f1_photo", "attribute_f1_title",
           "caption_token_f1", "trace_format_ok")


def student_from_teacher(teacher: Reasoner, layers: list[int]) -> Reasoner:
    """A reasoner with the teacher's decoder layers `layers` (in that order) and everything else copied."""
    n = teacher.cfg.n_layers
    if not layers or any(not 0 <= k < n for k in layers):
        raise ValueError(f"layers must be indices into the teacher's {n} decoder layers, got {layers}")
    student = Reasoner(dataclasses.replace(teacher.cfg, n_layers=len(layers)))
    src = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        if name.startswith("layers."):
            i, rest = name.split(".", 2)[1:]
            state[name] = src[f"layers.{layers[int(i)]}.{rest}"].clone()
        else:
            state[name] = src[name].clone()
    student.load_state_dict(state)
    return student


def read_traces(folder: Path) -> dict[str, dict[int, str]]:
    """{view: {product id: trace}} from a `sdk.train.traces` cache (the views it holds)."""
    out = {}
    for view in ("photo+title", "title", "photo"):
        path = folder / f"{view}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no traces for the {view} view; run python -m sdk.train.traces")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out[view] = {int(r["id"]): r["trace"] for r in rows}
    return out


@torch.inference_mode()
def decode_speed(model: Reasoner, tok, records: list[dict], deep_rows: dict, features, max_new_tokens: int = 64,
                 rounds: int = 2) -> dict:
    """Greedy trace generation in PyTorch over records (photo + title): tokens/s, ms per product."""
    model.eval()
    best = None
    for _ in range(rounds):
        t0, tokens = time.perf_counter(), 0
        for r in records:
            ids, _ = encode_example(tok, TASKS["trace"], None, r["title"])
            deep = torch.from_numpy(np.asarray(features[deep_rows[r["id"]]], dtype=np.float32))
            tokens += len(model.generate(ids, deep, max_new_tokens=max_new_tokens))
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return {"tokens_per_s": round(tokens / best, 1), "ms_per_product": round(1000 * best / len(records), 2)}


def model_card_section(report: dict) -> str:
    rows = "\n".join(f"| {k} | {report['teacher'][k]:.3f} | {report['student'][k]:.3f} |" for k in METRICS
                     if k in report["teacher"] and k in report["student"])
    sp = report["speed"]
    tc = report["train_config"]
    seq = " and sequence-level distillation on the teacher's traces" if report["sequence_level"] else ""
    return f"""
## Distilled from the {report['teacher_layers']}-layer reasoner
Student: {report['student_layers']} decoder layers (teacher layers {report['layers']}), {report['student_params'] / 1e6:.2f}M
parameters vs {report['teacher_params'] / 1e6:.2f}M; token-level KL to the teacher's logits (weight {tc['kd_weight']},
T={tc['kd_temperature']}){seq};
{tc['epochs']} epochs x {tc['tasks_per_item']} tasks per product, lr {tc['lr']}.

| metric (same {report['student'].get('items')} validation products) | teacher | student |
|---|---|---|
{rows}

Greedy trace generation in PyTorch, {sp['products']} products (photo + title), one process:
teacher {sp['teacher']['ms_per_product']} ms / {sp['teacher']['tokens_per_s']} tok/s, student
{sp['student']['ms_per_product']} ms / {sp['student']['tokens_per_s']} tok/s \
({sp['student_vs_teacher']:.2f}x the teacher's time).
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", required=True, type=Path)
    ap.add_argument("--features", required=True, type=Path, help="folder written by sdk.train.features")
    ap.add_argument("--teacher", type=Path,
                    default=REASONER_WEIGHTS)
    ap.add_argument("--layers", default="0,3", help="teacher decoder layers the student keeps (comma-separated)")
    ap.add_argument("--traces", type=Path, default=None, help="teacher traces (sdk.train.traces) for sequence-level KD")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--tasks-per-item", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--kd", type=float, default=0.5, help="weight of the token-level KL")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--speed-products", type=int, default=40)
    a = ap.parse_args(argv)
    teacher, tok = load_reasoner(a.teacher)
    layers = [int(x) for x in a.layers.split(",")]
    student = student_from_teacher(teacher, layers)
    traces = read_traces(a.traces) if a.traces else None
    cfg = TrainConfig(epochs=a.epochs, tasks_per_item=a.tasks_per_item, lr=a.lr, warmup=20, kd_weight=a.kd,
                      kd_temperature=a.temperature)
    metrics = train(a.catalog, a.features, a.out, cfg, student.cfg, start=(student, tok), teacher=teacher.eval(),
                    trace_targets=traces)
    t_report = json.loads((a.teacher / "reasoner_report.json").read_text())
    # speed: both models, same products, alternating, in this process
    from sdk.train.catalog import catalog_split, read_catalog

    meta = json.loads((a.features / "meta.json").read_text())
    has = np.load(a.features / "has_image.npy")
    deep_rows = {int(i): n for n, i in enumerate(meta["ids"]) if has[n]}
    features = np.load(a.features / "img_deep.npy", mmap_mode="r")
    split = catalog_split(a.catalog)
    recs = [p.record for p in read_catalog(a.catalog) if split.is_validation(p.id) and p.id in deep_rows][: a.speed_products]
    student, _ = load_reasoner(a.out)
    torch.set_num_threads(1)
    sp_t = decode_speed(teacher, tok, recs, deep_rows, features)
    sp_s = decode_speed(student, tok, recs, deep_rows, features)
    report = {
        "layers": layers, "teacher_layers": teacher.cfg.n_layers, "student_layers": student.cfg.n_layers,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "sequence_level": traces is not None, "train_config": dataclasses.asdict(cfg),
        "teacher": {k: t_report.get(k) for k in (*METRICS, "items")},
        "student": {k: metrics.get(k) for k in (*METRICS, "items")},
        "speed": {"products": len(recs), "threads": 1, "teacher": sp_t, "student": sp_s,
                  "student_vs_teacher": round(sp_s["ms_per_product"] / sp_t["ms_per_product"], 3)},
        "train_seconds": metrics.get("train_seconds"),
    }
    (a.out / "distill_report.json").write_text(json.dumps(report, indent=2))
    card = Path(metrics.get("card_path", a.out / "MODEL_CARD.md"))  # the card `train` generated
    text = card.read_text().replace("# moon3 reasoner: model card", "# moon3 reasoner student: model card", 1)
    if "Reproduce:" in text and "## Validation" in text:  # the student's own commands, not plain SFT
        cmd = (f"    python -m sdk.train.traces --catalog {a.catalog} --features {a.features} --reasoner {a.teacher} "
               f"--out .cache/traces\n" if traces is not None else "")
        cmd += (f"    python -m sdk.export.distill_reasoner --catalog {a.catalog} --features {a.features} \\\n"
                f"        --teacher {a.teacher} --layers {a.layers}"
                f"{' --traces .cache/traces' if traces is not None else ''} "
                f"--epochs {a.epochs} --kd {a.kd} --out {a.out}")
        text = text[:text.index("Reproduce:")] + f"Reproduce:\n\n{cmd}\n\n" + text[text.index("## Validation"):]
    card.write_text(text + model_card_section(report))
    print(json.dumps({k: report[k] for k in ("teacher", "student", "speed")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
