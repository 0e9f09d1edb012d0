"""The validation suite's verdict and its table: the metrics each family is judged on, the margin
over the linear probe each must reach, and the markdown table the model card and docs/validation.md
carry (`python -m sdk.train.evaluate --render`)."""

from __future__ import annotations

from pathlib import Path


def headline(family_result: dict, family: str) -> dict[str, float]:
    """The metrics a family is judged on, flattened as "task R@k" -> value (zero-shot: weighted F1;
    kNN: accuracy). The old split's numbers are for continuity, not judged."""
    flat: dict[str, float] = {}
    if not isinstance(family_result, dict) or "skipped" in family_result:
        return flat
    for task, v in family_result.items():
        if task == "old_split" or not isinstance(v, dict) or "skipped" in v:
            continue
        if family == "zero_shot":
            flat[f"{task} weighted F1"] = v["weighted_F1"]
        elif family == "knn":
            flat[f"{task} accuracy"] = v["accuracy"]
        elif family == "ood":  # the held-out category's own families
            flat.update({f"{FAMILY_TITLES.get(task, task)}: {m}": x for m, x in headline(v, task).items()})
        else:
            flat.update({f"{task} {m}": x for m, x in v.items() if m.startswith("R@")})
    return flat


def required_margin(probe_value: float, margin: float) -> float:
    """How far above the probe's `probe_value` (a recall, F1 or accuracy in [0, 1]) a subject must
    be: `margin`, or half the probe's remaining headroom where that is smaller (a probe at 0.996
    leaves 0.4 points; the subject must then close half of them)."""
    return min(margin, max(0.0, 1.0 - probe_value) / 2)


def compare(subject: dict, probe: dict, margin: float) -> dict:
    """Per family: every judged metric's margin over the probe, what it needed
    (`required_margin`), and whether all reach it; `min_excess` is the worst delta - required."""
    out = {}
    for family, res in subject.items():
        mine, theirs = headline(res, family), headline(probe.get(family, {}), family)
        deltas = {m: round(v - theirs[m], 4) for m, v in mine.items() if m in theirs}
        if deltas:
            need = {m: round(required_margin(theirs[m], margin), 4) for m in deltas}
            excess = min(deltas[m] - need[m] for m in deltas)
            out[family] = {"min_delta": min(deltas.values()), "min_excess": round(excess, 4),
                           "beats_probe": bool(excess >= -1e-9), "deltas": deltas, "required": need}
    return out


FAMILY_TITLES = {
    "cross_modal": "cross-modal",
    "renditions": "rendition → photo, image only",
    "zero_shot": "zero-shot prompts",
    "mm_rendition": "thumbnail + title → photo + title",
    "catalog": "query → photo + title catalog",
    "knn": "kNN (leave-one-design-out)",
    "ood": "held-out category",
}


def render_markdown(report: dict) -> str:
    """The report as a markdown table: every judged metric, the probe first, each subject with its
    margin over the probe (points), then the verdict and the old split's cross-modal numbers."""
    results, verdict = report["results"], report.get("verdict", {})
    names = [n for n in results if n != "probe"]
    head = "| family | metric | linear probe | " + " | ".join(f"{n} | Δ" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]
    for family in report["config"]["families"]:
        for metric, base in headline(results["probe"].get(family, {}), family).items():
            cells = []
            for n in names:
                v = headline(results[n].get(family, {}), family).get(metric)
                cells += ["—", ""] if v is None else [f"{v:.3f}", f"{100 * (v - base):+.1f}"]
            title = FAMILY_TITLES[family]
            if family == "ood" and "holdout" in report.get("ood", {}):
                title = f"held-out category ({report['ood']['holdout']}, trained without it)"
            lines.append(f"| {title} | {metric} | {base:.3f} | " + " | ".join(cells) + " |")
    margin = report["config"]["margin"]
    lines.append("")
    for n in names:
        v = verdict.get(n, {})
        fams = v.get("families", {}).items()
        worst = min(((f, d.get("min_excess", d["min_delta"] - margin)) for f, d in fams), key=lambda x: x[1], default=None)
        state = "beats the probe on every family" if v.get("beats_probe") else "does not beat the probe everywhere"
        extra = (f"; worst family {FAMILY_TITLES[worst[0]]}, {100 * worst[1]:+.1f} points from what it needs"
                 if worst else "")
        missing = f"; not scored: {', '.join(v['not_scored'])}" if v.get("not_scored") else ""
        lines.append(f"- **{n}** {state} (margin {100 * margin:.0f} points{extra}{missing}).")
    old = {n: r["cross_modal"]["old_split"] for n, r in results.items() if "old_split" in r.get("cross_modal", {})}
    if old:
        lines.append("")
        lines.append("Cross-modal R@1 / R@10 on the old split's validation products (ids ending in 0, "
                     f"{next(iter(old.values()))['products']} products), for continuity:")
        for n, o in old.items():
            lines.append(f"- {n}: title → photo {o['title->photo']['R@1']:.3f} / {o['title->photo']['R@10']:.3f}, "
                         f"photo → title {o['photo->title']['R@1']:.3f} / {o['photo->title']['R@10']:.3f}")
    sp = report["split"]
    lines.append("")
    lines.append(f"Split {sp['rule']}: {sp['validation']} validation / {sp['train']} training products "
                 f"({report['validation_photos']} validation photos); probe lr {report['probe']['training']['lr']:g}, "
                 f"{report['probe']['training']['epochs']} epochs.")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- suite table: generated by python -m sdk.train.evaluate --render -->", "<!-- end of suite table -->"


def write_table(report: dict, path: str | Path) -> Path:
    """Write the report's table to `path`: between the BEGIN/END markers where the file has them
    (the rest of the page is kept), else as the whole file."""
    from sdk.reports import write_marked

    return write_marked(path, BEGIN, END, render_markdown(report))
