"""Attribute heads: what a product photo shows, read by classifiers on the frozen image tower.

The reasoner has to *see* a product before it can write about it. Here each field the reasoner
is asked for (article type, colour, gender, usage, season and the catalog's attributes: pattern,
sleeve length, fit, ...) gets a softmax classifier over its training values plus "absent", on
the image tower's mean-pooled features (EfficientNet-Lite0, the cached `img_deep`), optionally
with the cached renditions as extra training photos. A field is written only when its class
probability clears a threshold picked on a group-held-out tenth of the training split, so the
heads say what they are sure of and leave the rest out: the confidence a completion needs.

They are scored exactly like the reasoner's attribute task (micro-F1 over key: value pairs of
`record_attributes`, the first 8 of a record) and its category task (exact `article_type`), on
the leak-free validation split; `--reasoner-engine` scores an engine's reasoner on the same
products in the same run.

    python -m sdk.train.attribute_heads --catalog ../shared/data/catalog --features .cache/features \\
        --reasoner-engine moon3.engine --report docs/results/attribute_heads.json

With `--out DIR` the fitted heads are written (`heads.safetensors`, FP16, and `heads.json`: the
fields, their classes and thresholds): `moon3 build` puts them in the reasoner's visual graph
(`sdk.export.onnx_reasoner`), and `sdk.Reasoner` answers the attribute, category and attribute-QA
tasks of a photo from them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

ABSENT = "<absent>"
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class HeadConfig:
    """How the heads are trained."""

    hidden: int = 0  # 0: one linear map per field; > 0: a shared ReLU layer of this width first
    epochs: int = 300  # full-batch Adam steps
    lr: float = 3e-3
    weight_decay: float = 1e-4
    min_count: int = 5  # a value needs this many training products to be a class
    renditions: bool = True  # the cached renditions of training photos as extra examples
    seed: int = 0
    thresholds: tuple[float, ...] = field(default=THRESHOLDS)


def fields() -> list[tuple[str, str | None]]:
    """(pair key as `record_attributes` writes it, record field or None for an `attributes` key), in its order."""
    from sdk.train.reasoner_model import ATTRIBUTE_KEYS, RECORD_FIELDS

    return [(name, f) for f, name in RECORD_FIELDS] + [(k.lower(), None) for k in ATTRIBUTE_KEYS]


def value_of(record: dict, key: str, record_field: str | None) -> str:
    if record_field is not None:
        return str(record.get(record_field) or "").strip()
    attrs = record.get("attributes") or {}
    hit = next((k for k in attrs if k.lower() == key), None)
    return str(attrs[hit]).strip() if hit else ""


class Heads:
    """Fitted heads: `predict(features)` -> per product, the (key, value) pairs they are sure of.

    `thresholds`: per field, the class probability a value needs to be written (picked on dev).
    """

    def __init__(self, classes: dict[str, list[str]], mean: np.ndarray, std: np.ndarray, model):
        self.classes, self.mean, self.std, self.model = classes, mean, std, model
        self.thresholds = {k: 0.0 for k in classes}

    def probabilities(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.from_numpy(((x - self.mean) / self.std).astype(np.float32)))
        return {k: torch.softmax(v, -1).numpy() for k, v in logits.items()}

    def predict(self, x: np.ndarray, thresholds: dict[str, float] | None = None, probs: dict | None = None,
                max_pairs: int | None = None) -> list[list[tuple]]:
        from sdk.train.reasoner_model import MAX_ATTRIBUTES

        t = {**self.thresholds, **(thresholds or {})}
        probs = self.probabilities(x) if probs is None else probs
        keys = [k for k, _ in fields() if k in probs]  # record_attributes' order
        best = {k: probs[k].argmax(1) for k in keys}
        sure = {k: (best[k] != 0) & (probs[k].max(1) >= t[k]) for k in keys}  # class 0 is ABSENT
        return [[(k, self.classes[k][best[k][i]]) for k in keys if sure[k][i]][: max_pairs or MAX_ATTRIBUTES]
                for i in range(len(x))]


HEADS_FILE, HEADS_META = "heads.safetensors", "heads.json"
FEATURE = "EfficientNet-Lite0 final map, mean-pooled, 224 px"


def save_heads(heads: Heads, folder: str | Path, hidden: int, record: dict | None = None) -> Path:
    """Write `heads` to `folder`: the trunk and per-field layers with the input normalisation
    (`heads.safetensors`, floating tensors in FP16) and `heads.json` (fields in order, their classes
    with "absent" first, thresholds, what the features are)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in heads.model.state_dict().items()}
    state["mean"] = torch.from_numpy(np.asarray(heads.mean, np.float32)).to(torch.float16)
    state["std"] = torch.from_numpy(np.asarray(heads.std, np.float32)).to(torch.float16)
    save_file(state, str(folder / HEADS_FILE))
    meta = {"feature": FEATURE, "dims": int(len(heads.mean)), "hidden": int(hidden),
            "fields": [{"key": k, "classes": list(v), "threshold": float(heads.thresholds.get(k, 0.0))}
                       for k, v in heads.classes.items()], **(record or {})}
    (folder / HEADS_META).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def write_card(report: dict, folder: str | Path) -> Path:
    """`folder/MODEL_CARD.md` from the run's report (every number in it is the report's) and the
    report itself beside it (`heads_report.json`)."""
    folder = Path(folder)
    (folder / "heads_report.json").write_text(json.dumps(report, indent=1) + "\n")
    val = report["heads"]["all validation photos"]
    cfg = report["config"]
    rows = "\n".join(f"| {k} | {report['classes'].get(k, '-')} | {cfg['thresholds'].get(k, 0.0):g} | {a:.3f} |"
                     for k, a in report["per_field_accuracy"].items())
    trunk = f"a {cfg['hidden']}-wide ReLU layer" if cfg["hidden"] else "none (one linear map per field)"
    card = f"""# Model card: attribute heads (what a product photo shows)

One softmax classifier per field the reasoner is asked for (article type, colour, gender, usage,
season, and the catalog's attributes), each over its training values plus "absent", on
{FEATURE} features: the image tower the reasoner's visual graph already runs. `moon3 build` puts
them in that graph (output "attributes", kept FP32 when the reasoner is quantized), and
`sdk.Reasoner` answers a photo's "attributes", "category" and "attribute_qa" tasks from them
(`Reasoner.read(photo)` gives the pairs with their probabilities). A field is written only when
its most likely value is not "absent" and clears the field's threshold, picked on a group-held-out
tenth of the training split. They read the photo only: a title given with it is not used.

Files: `heads.safetensors` (FP16), `heads.json` (fields, classes, thresholds), `heads_report.json`
(this run: the dev sweep, validation metrics, per-field accuracy).

## Training
{report['train_photos']} training-split photos of the leak-free split ({report['split']['rule']}), with
their cached renditions as extra examples ({cfg['renditions']}); trunk: {trunk}; {cfg['epochs']} full-batch
AdamW steps, lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}; a value is a class when at least
{cfg['min_count']} training products have it.

```bash
{report['command']}
```

## Validation ({report['validation_photos']} leak-free validation photos)
Scored as the reasoner is (`sdk.train.eval_reasoner`): attribute micro-F1 over the key: value
pairs of a record (its first 8) **{val['attribute_f1']:.3f}**, exact article type accuracy
**{val['category_acc']:.3f}**. Per field (argmax, "absent" a class):

| field | classes | threshold | accuracy |
|---|---|---|---|
{rows}

Colour is the weak field: ImageNet features do not name catalog colours.
"""
    path = folder / "MODEL_CARD.md"
    path.write_text(card)
    return path


def load_heads_module(folder: str | Path):
    """The heads in `folder` as one module: pooled features (B, dims) -> every field's softmax,
    concatenated in `heads.json`'s order (B, sum of class counts); and that metadata."""
    import torch

    from .storage import load_fp32_state

    folder = Path(folder)
    meta = json.loads((folder / HEADS_META).read_text())
    classes = {f["key"]: f["classes"] for f in meta["fields"]}
    state = load_fp32_state(folder / HEADS_FILE)
    model = _model(meta["dims"], classes, meta["hidden"])
    mean, std = state.pop("mean"), state.pop("std")
    model.load_state_dict(state)

    class HeadsModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.model((x - self.mean) / self.std)
            return torch.cat([torch.softmax(logits[k], -1) for k in classes], -1)

    return HeadsModule().eval(), meta


def _model(dims: int, classes: dict[str, list[str]], hidden: int):
    import torch
    from torch import nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(dims, hidden), nn.ReLU()) if hidden else nn.Identity()
            width = hidden or dims
            self.out = nn.ModuleDict({_safe(k): nn.Linear(width, len(v)) for k, v in classes.items()})
            self.keys = list(classes)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.trunk(x)
            return {k: self.out[_safe(k)](h) for k in self.keys}

    return Model()


def _safe(key: str) -> str:
    return "field_" + key.replace(" ", "_").replace(".", "_")


def fit(x: np.ndarray, records: Sequence[dict], cfg: HeadConfig, extra_x: np.ndarray | None = None,
        extra_rows: np.ndarray | None = None) -> Heads:
    """Train the heads on features `x` (one row per record) and, optionally, extra rows
    `extra_x` labelled like `records[extra_rows]` (renditions of the same photos)."""
    import torch

    if len(x) != len(records):
        raise ValueError(f"fit needs one feature row per record, got {len(x)} rows and {len(records)} records")
    torch.manual_seed(cfg.seed)
    classes, targets = {}, {}
    for key, f in fields():
        values = [value_of(r, key, f) for r in records]
        counts: dict[str, int] = {}
        for v in values:
            if v:
                counts[v] = counts.get(v, 0) + 1
        kept = sorted(v for v, c in counts.items() if c >= cfg.min_count)
        if not kept:
            continue
        classes[key] = [ABSENT, *kept]
        index = {v: n for n, v in enumerate(classes[key])}
        targets[key] = np.array([index.get(v, -100) if v else 0 for v in values], np.int64)  # rare values: ignored
    if not classes:
        raise ValueError(f"no field has a value on at least min_count={cfg.min_count} of the {len(records)} records: "
                         "nothing to learn (more records, or a lower min_count)")
    if extra_x is not None:
        x = np.concatenate([x, extra_x])
        targets = {k: np.concatenate([t, t[extra_rows]]) for k, t in targets.items()}
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy(((x - mean) / std).astype(np.float32))
    yt = {k: torch.from_numpy(t) for k, t in targets.items()}
    model = _model(x.shape[1], classes, cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    for _ in range(cfg.epochs):
        opt.zero_grad()
        logits = model(xt)
        loss = sum(loss_fn(logits[k], yt[k]) for k in classes)
        loss.backward()
        opt.step()
    model.eval()
    return Heads(classes, mean, std, model)


def tune_thresholds(heads: Heads, x: np.ndarray, records: Sequence[dict], grid: Sequence[float],
                    rounds: int = 2) -> dict[str, float]:
    """Per-field thresholds by coordinate ascent on micro-F1 over `records` (two passes)."""
    probs = heads.probabilities(x)
    best = dict(heads.thresholds)
    top = score(heads.predict(x, best, probs), records)["attribute_f1"]
    for _ in range(rounds):
        for key in heads.classes:
            for t in grid:
                trial = {**best, key: t}
                f1 = score(heads.predict(x, trial, probs), records)["attribute_f1"]
                if f1 > top + 1e-9:
                    top, best = f1, trial
    return best


def score(pairs: Sequence[Sequence[tuple[str, str]]], records: Sequence[dict]) -> dict:
    """The reasoner's metrics: attribute micro-F1 (pairs) and exact article-type accuracy."""
    from sdk.train.reasoner_model import record_attributes
    from sdk.train.train_reasoner import attribute_f1

    golds = [dict(record_attributes(r)) for r in records]
    preds = [dict(p) for p in pairs]
    return {"attribute_f1": attribute_f1(preds, golds),
            "category_acc": float(np.mean([p.get("article type") == r.get("article_type")
                                           for p, r in zip(preds, records)])),
            "items": len(records)}


def pooled(features: Path, name: str = "img_deep") -> np.ndarray:
    """Mean-pooled tower features of every cache row (float32; renditions: (N, K, C)), computed once
    and kept beside the cache (`pooled_<name>.npy`)."""
    cached = features / f"pooled_{name}.npy"
    if cached.is_file() and cached.stat().st_mtime >= (features / f"{name}.npy").stat().st_mtime:
        return np.load(cached)
    arr = np.load(features / f"{name}.npy", mmap_mode="r")
    out = np.concatenate([np.asarray(arr[i:i + 256], np.float32).mean(-2) for i in range(0, len(arr), 256)])
    np.save(cached, out)
    return out


def photo_split(catalog, features: Path):
    """(feature-cache row of each product id with a photo, the catalog's split, its training-split
    products with a photo, its validation-split products with a photo)."""
    from sdk.train.catalog import catalog_split, read_catalog

    meta = json.loads((features / "meta.json").read_text())
    has = np.load(features / "has_image.npy")
    row_of = {int(i): n for n, i in enumerate(meta["ids"]) if has[n]}
    split = catalog_split(catalog)
    products = [p for p in read_catalog(catalog) if p.id in row_of]
    return (row_of, split, [p for p in products if not split.is_validation(p.id)],
            [p for p in products if split.is_validation(p.id)])


def _dev_sweep(widths: Sequence[int], renditions: bool, x: dict, records: dict, ex_fit) -> list[dict]:
    """Heads of each trunk width fitted on the fit part and scored on the dev part, at each shared
    threshold and with per-field tuned thresholds."""
    sweep = []
    for hidden in widths:
        cfg = HeadConfig(hidden=hidden, renditions=renditions)
        heads = fit(x["fit"], records["fit"], cfg, *ex_fit)
        for t in cfg.thresholds:
            m = score(heads.predict(x["dev"], {k: t for k in heads.classes}), records["dev"])
            sweep.append({"hidden": hidden, "threshold": t, **m})
            print(f"dev: hidden {hidden} threshold {t}: attribute F1 {m['attribute_f1']:.4f} "
                  f"category {m['category_acc']:.4f}", flush=True)
        tuned = tune_thresholds(heads, x["dev"], records["dev"], cfg.thresholds)
        m = score(heads.predict(x["dev"], tuned), records["dev"])
        sweep.append({"hidden": hidden, "threshold": "per field", "thresholds": tuned, **m})
        print(f"dev: hidden {hidden} per-field thresholds: attribute F1 {m['attribute_f1']:.4f} "
              f"category {m['category_acc']:.4f}", flush=True)
    return sweep


def _score_reasoner(engine, catalog, val_records: Sequence[dict], n_r: int) -> dict:
    """The engine's reasoner on the first `n_r` validation photos, the heads' measures."""
    from sdk.train.eval_reasoner import eval_records, evaluate_engine

    recs = eval_records(catalog, None, n_r)
    assert [r["id"] for r in recs] == [r["id"] for r in val_records[:n_r]], "validation orders differ"
    m, _ = evaluate_engine(engine, recs, threads=1, trace_items=0)
    out = {"engine": str(engine), "items": n_r,
           "attribute_f1": m["attribute_f1_photo"], "category_acc": m["category_acc_photo"],
           "attribute_f1_from_title": m["attribute_f1_title"], "precision": m["precision"]}
    print(f"reasoner of {engine}, first {n_r}: {out}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--features", required=True, type=Path, help="feature cache of sdk.train.features")
    ap.add_argument("--hidden", type=int, nargs="+", default=[0, 512], help="trunk widths to try (0: linear)")
    ap.add_argument("--no-renditions", action="store_true", help="train on the original photos only")
    ap.add_argument("--reasoner-engine", help="also score this engine's reasoner on the same validation products")
    ap.add_argument("--reasoner-items", type=int, default=300, help="validation products for the reasoner (slow)")
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--out", type=Path, help="write the fitted heads here (heads.safetensors + heads.json)")
    args = ap.parse_args(argv)
    t0 = time.time()
    row_of, split, train, val = photo_split(args.catalog, args.features)
    # model selection on a group-held-out tenth of the training split (whole title groups)
    groups = np.unique([split.group[p.id] for p in train])
    dev_groups = set(np.random.default_rng(0).choice(groups, size=len(groups) // 10, replace=False).tolist())
    fit_part = [p for p in train if split.group[p.id] not in dev_groups]
    dev_part = [p for p in train if split.group[p.id] in dev_groups]
    parts = {"train": train, "fit": fit_part, "dev": dev_part, "val": val}
    rows = {name: np.array([row_of[p.id] for p in ps]) for name, ps in parts.items()}
    records = {name: [p.record for p in ps] for name, ps in parts.items()}
    every = pooled(args.features)
    x = {name: every[r] for name, r in rows.items()}
    renditions = not args.no_renditions and (args.features / "img_deep_aug.npy").is_file()
    aug = pooled(args.features, "img_deep_aug") if renditions else None

    def extra(name):
        if aug is None:
            return None, None
        xs = aug[rows[name]]  # (n, K, C)
        return xs.reshape(-1, xs.shape[-1]), np.repeat(np.arange(len(rows[name])), xs.shape[1])

    sweep = _dev_sweep(args.hidden, renditions, x, records, extra("fit"))
    best = max(sweep, key=lambda s: (s["attribute_f1"], s["category_acc"]))
    cfg = HeadConfig(hidden=best["hidden"], renditions=renditions)
    heads = fit(x["train"], records["train"], cfg, *extra("train"))
    heads.thresholds = best.get("thresholds") or {k: best["threshold"] for k in heads.classes}
    pairs = heads.predict(x["val"])
    n_r = min(args.reasoner_items, len(val))
    report = {
        "command": "python -m sdk.train.attribute_heads " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "config": {**asdict(cfg), "thresholds": heads.thresholds},
        "split": split.summary(), "train_photos": len(train), "validation_photos": len(val),
        "classes": {k: len(v) - 1 for k, v in heads.classes.items()},
        "dev_sweep": sweep,
        "heads": {"all validation photos": score(pairs, records["val"]),
                  f"first {n_r} validation photos": score(pairs[:n_r], records["val"][:n_r])},
        "per_field_accuracy": _per_field(heads, x["val"], records["val"]),
    }
    print(f"heads, {len(val)} validation photos: {report['heads']['all validation photos']}", flush=True)
    if args.reasoner_engine:
        report["reasoner"] = _score_reasoner(args.reasoner_engine, args.catalog, records["val"], n_r)
    report["seconds"] = round(time.time() - t0, 1)
    if args.out:
        save_heads(heads, args.out, cfg.hidden, {"command": report["command"], "commit": report["commit"],
                                                 "validation": report["heads"]["all validation photos"]})
        write_card(report, args.out)
        print(f"wrote {args.out}")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.report}")
    return 0


def _per_field(heads: Heads, x: np.ndarray, records: Sequence[dict]) -> dict:
    """Per field: accuracy of the argmax (absent counted as a class) on the validation photos."""
    probs = heads.probabilities(x)
    out = {}
    for key, f in fields():
        if key not in probs:
            continue
        pred = [heads.classes[key][j] for j in probs[key].argmax(1)]
        gold = [value_of(r, key, f) or ABSENT for r in records]
        out[key] = round(float(np.mean([p.lower() == g.lower() for p, g in zip(pred, gold)])), 4)
    return out


if __name__ == "__main__":
    sys.exit(main())
