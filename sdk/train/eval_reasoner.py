"""Measure an engine's reasoner on held-out products through the runtime, and gate a quantized one.

    python -m sdk.train.eval_reasoner --engine moon3.engine --catalog ../shared/data/catalog --limit 300
    python -m sdk.train.eval_reasoner --engine int4.engine --engine int8.engine --reference fp32.engine \
        --catalog ../shared/data/catalog --limit 300 --json report.json

The engine's reasoner runs with `sdk.Reasoner` (numpy + onnxruntime, greedy), exactly as users run
it, on the validation split (ids ending in 0, never trained on) of a catalog, or on every product
of a samples folder. The tasks and metrics are those of the model card (`sdk.train.train_reasoner`,
whose metric functions are used here): caption token-F1 from the photo; category accuracy and
attribute micro-F1 from the photo alone and from the title alone; well-formed traces (photo and
title) on the first `trace_items` products.

With `--reference`, the same generations of a reference engine (the FP32 reasoner) are compared
token by token: `exact` is the share of generations with identical tokens, `tokens` the share of
token positions that agree before the first difference (greedy decoding diverges from there),
and the gates (`ReasonerGates`) say whether the candidate may ship.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# (key, task, photo, title): one greedy generation per product each
EVAL_CASES = (("caption/photo", "caption", True, False), ("category/photo", "category", True, False),
              ("category/title", "category", False, True), ("attributes/photo", "attributes", True, False),
              ("attributes/title", "attributes", False, True), ("trace/photo+title", "trace", True, True))


@dataclass
class ReasonerGates:
    """Most a quantized reasoner may lose against the FP32 one (absolute drops; 0.01 = 1 point)."""

    max_attribute_f1_drop: float = 0.01  # worst of photo-only and title-only attribute micro-F1
    max_category_acc_drop: float = 0.02  # worst of photo-only and title-only category accuracy
    min_token_agreement: float = 0.80  # share of greedy tokens that agree before the first difference

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")


def eval_records(catalog: str | Path | None, samples: str | Path | None, limit: int) -> list[dict]:
    """Catalog records with a photo (the "image" key an absolute path): the validation split of
    `catalog`, else every product of the `samples` folder; at most `limit`."""
    from sdk.train.catalog import catalog_split, read_catalog

    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    root = catalog if catalog is not None else samples
    if root is None:
        raise ValueError("give a catalog or a samples folder")
    split = catalog_split(catalog) if catalog is not None else None
    products = [p for p in read_catalog(root) if p.image is not None and (split is None or split.is_validation(p.id))]
    return [{**p.record, "image": str(p.image)} for p in products[:limit]]


def generate_all(reasoner, records: Sequence[dict], *, max_new_tokens: int = 64, trace_items: int = 100,
                 log: Callable[[str], None] | None = None) -> dict[str, list[list[int]]]:
    """Greedy token ids of every EVAL_CASES generation: key -> one list per product (trace: the first
    `trace_items`)."""
    out: dict[str, list[list[int]]] = {key: [] for key, *_ in EVAL_CASES}
    t0 = time.time()
    for n, r in enumerate(records):
        for key, task, photo, title in EVAL_CASES:
            if task == "trace" and n >= trace_items:
                continue
            out[key].append(reasoner.generate_ids(image=r["image"] if photo else None,
                                                  text=r["title"] if title else None, task=task,
                                                  max_new_tokens=max_new_tokens))
        if log and (n + 1) % 50 == 0:
            log(f"      {n + 1}/{len(records)} products, {time.time() - t0:.0f} s")
    return out


def score(decode: Callable[[Sequence[int]], str], outputs: dict[str, list[list[int]]], records: Sequence[dict]) -> dict:
    """The model card's metrics of `generate_all` outputs (`decode`: token ids -> text)."""
    from sdk.train.reasoner_model import parse_attributes, record_attributes
    from sdk.train.train_reasoner import attribute_f1, token_f1

    text = {k: [decode(ids) for ids in v] for k, v in outputs.items()}
    m: dict[str, Any] = {"items": len(records)}
    m["caption_token_f1"] = float(np.mean([token_f1(p, r["title"]) for p, r in zip(text["caption/photo"], records)]))
    for mode in ("photo", "title"):
        m[f"category_acc_{mode}"] = float(np.mean([p == r.get("article_type") for p, r in
                                                   zip(text[f"category/{mode}"], records)]))
        m[f"attribute_f1_{mode}"] = attribute_f1([parse_attributes(p) for p in text[f"attributes/{mode}"]],
                                                 [dict(record_attributes(r)) for r in records])
    traces = text["trace/photo+title"]
    m["trace_format_ok"] = float(np.mean([t.startswith("<think>") and "</think>" in t and
                                          len(t.split("</think>")[-1].strip()) > 0 for t in traces])) if traces else None
    return m


def agreement(outputs: dict[str, list[list[int]]], reference: dict[str, list[list[int]]]) -> dict:
    """Token agreement of two engines' greedy generations (same products, same cases)."""
    same = total = agree = span = 0
    for key, ref in reference.items():
        for a, b in zip(outputs[key], ref):
            total += 1
            same += a == b
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            # lengths count <eos>: stopping at a different step is a disagreement too
            agree += k + (a == b)
            span += max(len(a), len(b)) + 1
    return {"generations": total, "exact": same / max(total, 1), "tokens": agree / max(span, 1)}


def gate(reference: dict, candidate: dict, agree: dict, gates: ReasonerGates, n_items: int | None = None) -> dict:
    """Drops of the candidate's metrics against the reference's, and the gates' verdict.

    With `n_items` (the products measured), a category accuracy drop of a single product always
    passes: accuracy moves in steps of 1/n, and a gate finer than that (2 points on 20 products)
    would fail on any one changed answer.
    """
    drops = {k: round(reference[k] - candidate[k], 6) for k in
             ("attribute_f1_photo", "attribute_f1_title", "category_acc_photo", "category_acc_title", "caption_token_f1")}
    failed = []
    worst_attr = max(drops["attribute_f1_photo"], drops["attribute_f1_title"])
    worst_cat = max(drops["category_acc_photo"], drops["category_acc_title"])
    if worst_attr > gates.max_attribute_f1_drop:
        failed.append(f"attribute F1 drop {worst_attr:.4f} > {gates.max_attribute_f1_drop}")
    cat_limit = max(gates.max_category_acc_drop, round(1.0 / n_items, 6) if n_items else 0.0)
    if worst_cat > cat_limit:
        failed.append(f"category accuracy drop {worst_cat:.4f} > {cat_limit:g}")
    if agree["tokens"] < gates.min_token_agreement:
        failed.append(f"token agreement {agree['tokens']:.4f} < {gates.min_token_agreement}")
    return {"reference": reference, "candidate": candidate, "drop": drops, "agreement": agree,
            "gates": asdict(gates), "passed": not failed, "failed": failed}


def evaluate_engine(engine: str | Path, records: Sequence[dict], *, threads: int | None = None,
                    max_new_tokens: int = 64, trace_items: int = 100, log=None) -> tuple[dict, dict]:
    """(metrics, generations) of an engine's reasoner on `records`."""
    from sdk.reasoner import Reasoner

    r = Reasoner(engine, threads=threads)
    t0 = time.time()
    outputs = generate_all(r, records, max_new_tokens=max_new_tokens, trace_items=trace_items, log=log)
    metrics = score(r.decode, outputs, records)
    metrics["precision"] = r.precision
    metrics["seconds"] = round(time.time() - t0, 1)
    return metrics, outputs


def format_metrics(m: dict) -> str:
    return (f"attribute F1 photo {m['attribute_f1_photo']:.4f} title {m['attribute_f1_title']:.4f}; "
            f"category acc photo {m['category_acc_photo']:.4f} title {m['category_acc_title']:.4f}; "
            f"caption token F1 {m['caption_token_f1']:.4f}; traces well formed {m['trace_format_ok']}")


def render(report: dict) -> str:
    """A `--json` report as a markdown table: one row per engine (the reference first)."""
    cols = (("attribute F1, photo", "attribute_f1_photo"), ("article type, photo", "category_acc_photo"),
            ("attribute F1, title", "attribute_f1_title"), ("article type, title", "category_acc_title"),
            ("caption token F1", "caption_token_f1"), ("seconds", "seconds"))
    rows = ([("reference: " + str(report["reference"].get("engine", "")), report["reference"])] if "reference" in report
            else []) + [(name, e["metrics"]) for name, e in report["engines"].items()]
    out = [f"{report['items']} products of {report['source']}:", "", "| engine | " + " | ".join(c for c, _ in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for name, m in rows:
        out.append(f"| {name} ({m.get('precision')}) | " + " | ".join(
            f"{m[k]:.4f}" if k != "seconds" else f"{m[k]:.0f}" for _, k in cols) + " |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdk.train.eval_reasoner", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, type=Path, action="append",
                    help="engine whose reasoner is measured (repeatable: each is compared with the reference)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="reference engine (FP32) to compare tokens and gate against")
    ap.add_argument("--catalog", type=Path, default=None, help="catalog folder; its validation split is used")
    ap.add_argument("--samples", type=Path, default=None, help="or a samples folder (every product); default data/samples")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--trace-items", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    for name, v in asdict(ReasonerGates()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=v)
    a = ap.parse_args(argv)
    from sdk.paths import SAMPLES

    gates = ReasonerGates(**{k: getattr(a, k) for k in asdict(ReasonerGates())})
    records = eval_records(a.catalog, a.samples or (None if a.catalog else SAMPLES), a.limit)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    report: dict[str, Any] = {"source": str(a.catalog or a.samples or SAMPLES), "items": len(records), "engines": {}}
    outputs = {}
    for name, path in [("reference", a.reference)] * (a.reference is not None) + [(str(e), e) for e in a.engine]:
        log(f"{name}: {path} on {len(records)} products")
        m, outputs[name] = evaluate_engine(path, records, threads=a.threads, max_new_tokens=a.max_new_tokens,
                                           trace_items=a.trace_items, log=log)
        m["engine_mib"] = round(path.stat().st_size / 2**20, 2)
        if name == "reference":
            report["reference"] = m
        else:
            report["engines"][name] = {"metrics": m}
        print(f"{path} ({m['precision']}, {m['engine_mib']} MiB): {format_metrics(m)}  [{m['seconds']} s]")
        if name != "reference" and a.reference is not None:
            g = gate(report["reference"], m, agreement(outputs[name], outputs["reference"]), gates, n_items=len(records))
            report["engines"][name]["gate"] = g
            ag = g["agreement"]
            print(f"  vs {a.reference}: {ag['exact']:.4f} of generations identical, {ag['tokens']:.4f} of tokens agree; "
                  f"drops {g['drop']}; gates {'passed' if g['passed'] else 'FAILED: ' + '; '.join(g['failed'])}")
    code = 0 if all(e.get("gate", {}).get("passed", True) for e in report["engines"].values()) else 1
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render(json.loads(Path(sys.argv[2]).read_text())))
        raise SystemExit(0)
    raise SystemExit(main())
