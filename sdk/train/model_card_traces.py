"""The embedder model card's "Reasoning traces" section: Think-Then-Embed with the reasoner's
traces, the reasoner's trace scores, TTE_u and GRPO, each from its report when it exists."""

from __future__ import annotations

import numpy as np

TITLE_COSINE = "cosine to the embedder's vector (title view)"


TRACE_TASKS = ("text->image", "image->text", "mm->mm", "description->mm")


TRACE_CMDS = (
    ".venv/bin/python -m sdk.train.traces --catalog ../shared/data/catalog --features .cache/features --out .cache/traces",
    ".venv/bin/python -m sdk.train.traces --catalog ../shared/data/catalog --features .cache/features --out .cache/traces "
    "--views oracle",
    ".venv/bin/python -m sdk.train.traces --catalog ../shared/data/catalog --out .cache/traces --score "
    "&& cp .cache/traces/score.json runs/trace_score.json",
    ".venv/bin/python -m sdk.train.train_embedder --features .cache/features --traces .cache/traces --init runs/full "
    "--epochs {epochs} --lr {lr} --warmup-steps {warmup} --freeze-image --out runs/full_trace --report runs/full_trace.json",
    ".venv/bin/python -m sdk.train.train_embedder --features .cache/features --traces .cache/traces "
    "--trace-views photo+title title photo oracle --init runs/full_trace --eval-only --report runs/full_trace_eval.json",
    ".venv/bin/python -m research.tte --features .cache/features --traces .cache/traces --catalog ../shared/data/catalog "
    "--embedder runs/full_trace --out runs/tte && cp runs/tte/tte.json runs/tte.json",
    ".venv/bin/python -m research.grpo --catalog ../shared/data/catalog --features .cache/features --traces .cache/traces "
    "--embedder runs/full_trace --out runs/reasoner_grpo --eval && cp runs/reasoner_grpo/grpo.json runs/grpo.json",
)


def trace_section(reports: dict) -> list[str]:
    """Think-Then-Embed: trace off / on / TTE_u, and GRPO, when those reports exist."""
    if "full_trace" not in reports:
        return []
    # the model the trace-trained copy continued from: the default of its day (reports/trace_base.json
    # once a newer default replaced it), else the shipped one
    r, base = reports["full_trace"], reports.get("trace_base", reports["full"])
    f, b = r["final"], base["final"]
    tc = r["train_config"]
    lines = [
        "## Reasoning traces (Think-Then-Embed)",
        "The reasoner (`sdk/train/weights/reasoner`) writes a trace for every product from what each side",
        "of a search shows it: photo+title (catalog side), title alone (a text query), photo alone (a",
        "photo query). Traces are greedy, batched (`sdk.train.traces`), cached with the MiniLM token",
        "states the trace modality reads (at most 128 tokens, the engine's trace budget).",
        "The first trace-trained embedder (on the earlier reasoner's traces; `sdk/train/weights/trace` now",
        "holds its retrained successor, next subsection) continued from "
        + ("the previous default model (its report: `reports/trace_base.json`) for " if "trace_base" in reports
           else "the default model for ")
        + f"{tc['epochs']} epochs (lr {tc['lr']},",
        "image encoder frozen) with the trace views added to the loss (text+trace -> mm+trace, "
        "image+trace -> mm+trace, mm+trace <->",
        f"mm, text+trace -> mm, image+trace <-> text+trace; {tc['trace_drop']:.0%} of traced rows drop the trace).",
        f"Training took {r['seconds'] / 60:.1f} min. Validation R@1 / R@10 (same protocol as above"
        + ("; on that model's split, the\nearlier one: validation ids ending in 0, "
           f"{base['val_items']} products" if "trace_base" in reports else "") + "):",
        "",
        "| model, traces | " + " | ".join(f"{t} R@1 / R@10" for t in TRACE_TASKS) + " |",
        "|" + "---|" * (len(TRACE_TASKS) + 1),
        "| before trace training, no traces | " + " | ".join(
            f"{b[f'{t} R@1']:.3f} / {b[f'{t} R@10']:.3f}" for t in TRACE_TASKS) + " |",
        "| trace-trained, no traces | " + " | ".join(
            f"{f[f'{t} R@1']:.3f} / {f[f'{t} R@10']:.3f}" for t in TRACE_TASKS) + " |",
        "| trace-trained, traces on both sides | " + " | ".join(
            f"{f[f'trace {t} R@1']:.3f} / {f[f'trace {t} R@10']:.3f}" for t in TRACE_TASKS) + " |",
        "| trace-trained, traces on the catalog side only | "
        f"{f['catalog-trace text->image R@1']:.3f} / {f['catalog-trace text->image R@10']:.3f} | - | "
        f"{f['catalog-trace mm->mm R@1']:.3f} / {f['catalog-trace mm->mm R@10']:.3f} | - |",
    ]
    if "oracle-trace text->image R@10" in f:
        lines.append("| trace-trained, oracle traces (the catalog fields' own trace, both sides) | "
                     f"{f['oracle-trace text->image R@1']:.3f} / {f['oracle-trace text->image R@10']:.3f} | - | - | - |")
    lines += [
        "",
        "(description->mm with traces: the description query has no trace; the catalog side has one.)",
        "Its fp16 copy measured within 0.003 of these numbers.",
        "",
    ]
    if "trace_score" in reports and "oracle-trace text->image R@10" in f:
        lines += _trace_scores(reports["trace_score"], f)
    if "tte" in reports:
        lines += _tte_section(reports["tte"])
    if "grpo" in reports and "validation" in reports["grpo"]:
        lines += _grpo_section(reports["grpo"])
    if "trace3_eval" in reports:
        lines += _stage3_traces(reports["trace3_eval"]["final"], reports.get("trace3_score", {}), f,
                                reports.get("trace3_train"), reports.get("trace3_fp16_eval"), b["text->image R@10"])
        if "tte" in reports and "tte3" in reports:
            lines += _stage3_tte(reports["tte"], reports["tte3"])
        if "grpo" in reports and "grpo3" in reports:
            lines += _stage3_grpo(reports["grpo"], reports["grpo3"])
    lines += ["Reproduce (after the commands below):", "```bash",
              *[c.format(epochs=tc["epochs"], lr=tc["lr"], warmup=tc["warmup_steps"]) for c in TRACE_CMDS],
              ".venv/bin/python -m sdk.train.fusion_model runs/full_trace runs/full_trace_fp16   # fp16 copy", "```", ""]
    return lines


def _trace_scores(sc: dict, f: dict) -> list[str]:
    """How often the reasoner's traces state the record's fields, and the oracle traces' gain."""
    val = {v: sc.get(f"{v} validation", {}) for v in ("title", "photo", "photo+title")}
    return [
        "Why the reasoner's traces do not help yet: they state the product's fields wrongly most of",
        "the time. Share of validation traces stating the record's article type / colour / gender",
        "(`python -m sdk.train.traces --catalog ../shared/data/catalog --out .cache/traces --score`):",
        "",
        "| reasoner shown | article type | colour | gender |",
        "|---|---|---|---|",
        *[f"| {v} | {a.get('article type', float('nan')):.3f} | {a.get('colour', float('nan')):.3f} | "
          f"{a.get('gender', float('nan')):.3f} |" for v, a in val.items()],
        "",
        "The same traces on training products score the same, so this is under-training, not",
        "over-fitting. With the catalog fields' own traces (the oracle row) the trace modality adds",
        f"{f['oracle-trace text->image R@10'] - f['text->image R@10']:+.3f} text->image R@10 and "
        f"{f['oracle-trace text->image R@1'] - f['text->image R@1']:+.3f} R@1 over no traces: the embedder uses",
        "traces; a reasoner that reads products right is what the gain waits for.",
        "",
    ]


def _tte_section(t: dict) -> list[str]:
    """TTE_u: the vector from the reasoner's own hidden states."""
    v = t["validation"]
    return [
        "### TTE_u: the vector from the reasoner's own hidden states",
        f"A head (LayerNorm, MLP 256-512-256, L2) reads layer {t['layer']} of the reasoner's hidden states,",
        "mean-pooled over the prompt and the trace it wrote, and is trained into the embedder's space",
        "(cosine distillation to the trace-on vector of the same view + in-batch InfoNCE), on",
        f"{t['fit_items']} training products; the layer was picked on a held-out tenth of them. On the",
        f"{t['val_items']} validation products with a photo:",
        "",
        "| path | text->image R@10 | image->text R@10 |",
        "|---|---|---|",
        f"| two models: reasoner trace -> embedder | {v['text->image R@10 (two models, trace on)']:.3f} | "
        f"{v['image->text R@10 (two models, trace on)']:.3f} |",
        f"| TTE_u on both sides (one model) | {v['text->image R@10 (TTE_u both sides)']:.3f} | "
        f"{v['image->text R@10 (TTE_u both sides)']:.3f} |",
        f"| TTE_u query vs embedder catalog | {v['text->image R@10 (TTE_u query, embedder gallery)']:.3f} | - |",
        "",
        "TTE_u is far behind with this reasoner: its photo-view states carry little of the product",
        "(photo traces name the article type a fifth of the time) and the mean over a trace of mostly",
        "generic tokens washes out the title (cosine to the embedder's own title vector "
        f"{v[TITLE_COSINE]:.2f}). The two-model path stays the one to use.",
        "",
    ]


def _grpo_section(g: dict) -> list[str]:
    """GRPO with a retrieval reward: what it trains and what it gives."""
    c, v = g["config"], g["validation"]
    h = g["history"]
    return [
        "### GRPO with a retrieval reward",
        *GRPO_FROZEN,
        f"{c['steps']} steps of {c['products_per_step']} training products x {c['group']} sampled title-only traces",
        f"(temperature {c['temperature']}); reward = cos(query, own catalog vector) - the hardest of "
        f"{c['negatives']} negatives",
        f"+ {c['format_weight']} x well-formed - {c['length_weight']} x tokens; group-normalised advantages; KL to the",
        f"SFT reasoner (beta {c['beta']}); lr {c['lr']}; {g['seconds'] / 60:.1f} min. Mean reward over the first / last",
        f"10 steps: {np.mean([x['reward'] for x in h[:10]]):.3f} / {np.mean([x['reward'] for x in h[-10:]]):.3f}.",
        "Validation text->image R@10 with the same embedder and catalog vectors:",
        "",
        "| query | R@10 |",
        "|---|---|",
        f"| title, no trace | {v['text->image R@10, query without trace']:.3f} |",
        f"| title + SFT trace | {v['text->image R@10, SFT query traces']:.3f} |",
        f"| title + GRPO trace | {v['text->image R@10, GRPO query traces']:.3f} |",
        "",
    ]


def _stage3_traces(e: dict, score: dict, before: dict, retrained: dict | None = None,
                   shipped: dict | None = None, default_r10: float = float("nan")) -> list[str]:
    """The trace-trained embedder measured with traces of the stage-3 reasoner, and (when its
    reports exist) the trace modality retrained on those traces, which `sdk/train/weights/trace` holds."""
    val = {v: score.get(f"{v} validation", {}) for v in ("title", "photo", "photo+title")}
    rows = [("no traces", "", "text->image"), ("traces on both sides", "trace ", "text->image"),
            ("traces on the catalog side only", "catalog-trace ", "text->image"),
            ("oracle traces (the catalog fields' own, both sides)", "oracle-trace ", "text->image")]
    new = (shipped or {}).get("final") or (retrained or {}).get("final")
    lines = [
        "### With the stage-3 reasoner's traces",
        "The reasoner's third training stage (its model card) more than doubled its category accuracy. Its",
        "traces state the record's fields far more often (share of validation traces, same scoring):",
        "",
        "| reasoner shown | article type | colour | gender |",
        "|---|---|---|---|",
        *[f"| {v} | {a.get('article type', float('nan')):.3f} | {a.get('colour', float('nan')):.3f} | "
          f"{a.get('gender', float('nan')):.3f} |" for v, a in val.items()],
        "",
        "Validation text->image R@1 / R@10 of the first trace-trained embedder with the earlier and with the",
        "stage-3 reasoner's traces" + (", and of the trace modality retrained on the stage-3 traces (what"
                                       if new else ":"),
    ]
    if new:
        lines.append("`sdk/train/weights/trace` holds):")
    lines += ["", "| traces | first model, earlier traces | first model, stage-3 traces |"
              + (" retrained on stage-3 traces |" if new else ""),
              "|---|---|---|" + ("---|" if new else "")]

    def cell(d: dict, k: str) -> str:
        return f"{d[k + ' R@1']:.3f} / {d[k + ' R@10']:.3f}" if k + " R@10" in d else "-"

    for label, pre, task in rows:
        k = f"{pre}{task}"
        lines.append(f"| {label} | {cell(before, k)} | {cell(e, k)} |" + (f" {cell(new, k)} |" if new else ""))
    lines += [
        "",
        "(`python -m sdk.train.train_embedder --features .cache/features --traces .cache/traces3 --trace-views",
        "photo+title title photo oracle --init runs/full_trace --eval-only`, traces written with",
        "`python -m sdk.train.traces ... --reasoner sdk/train/weights/reasoner --out .cache/traces3`.)",
    ]
    if new and retrained:
        tc = retrained["train_config"]
        lines += [
            "",
            f"Training the trace modality on these traces ({tc['epochs']} epochs from the default weights, as the first",
            f"model was trained, lr {tc['lr']}, image encoder frozen, {retrained['seconds'] / 60:.1f} min): traces on the",
            "catalog side no longer cost recall "
            f"({new['catalog-trace text->image R@10'] - new['text->image R@10']:+.3f} text->image R@10 over no traces,",
            f"within noise; the first model: {before['catalog-trace text->image R@10'] - before['text->image R@10']:+.3f}) "
            "and traces on both sides cost less",
            f"({new['trace text->image R@10'] - new['text->image R@10']:+.3f}; the first model: "
            f"{before['trace text->image R@10'] - before['text->image R@10']:+.3f}). The trace-free default weights",
            f"still lead on text->image R@10 ({default_r10:.3f}). Reproduce:",
            "```bash",
            ".venv/bin/python -m sdk.train.traces --catalog ../shared/data/catalog --features .cache/features "
            "--reasoner sdk/train/weights/reasoner --out .cache/traces3",
            ".venv/bin/python -m sdk.train.traces --catalog ../shared/data/catalog --features .cache/features "
            "--reasoner sdk/train/weights/reasoner --out .cache/traces3 --views oracle",
            ".venv/bin/python -m sdk.train.train_embedder --features .cache/features --traces .cache/traces3 "
            f"--init sdk/train/weights --epochs {tc['epochs']} --lr {tc['lr']} --warmup-steps {tc['warmup_steps']} "
            "--freeze-image --out runs/full_trace3",
            ".venv/bin/python -m sdk.train.fusion_model runs/full_trace3 sdk/train/weights/trace   # fp16 copy",
            "```",
        ]
    lines.append("")
    return lines


TTE_ROWS = ("text->image R@10 (TTE_u query, embedder gallery)", "text->image R@10 (TTE_u both sides)",
            "image->text R@10 (TTE_u both sides)", "mm->mm R@10 (TTE_u query, embedder gallery)",
            "text->image R@10 (two models, trace on)")


TTE_LABELS = {"mm->mm R@10 (TTE_u query, embedder gallery)":
              "photo+title->photo R@10 (TTE_u photo+title query, embedder photo gallery)"}


def _stage3_tte(before: dict, after: dict) -> list[str]:
    """TTE_u on the earlier reasoner's hidden states against the stage-3 reasoner's."""
    v0, v1 = before["validation"], after["validation"]
    return [
        "TTE_u (one model for trace and vector) on the stage-3 reasoner's hidden states, trained against",
        "the retrained trace embedder (`python -m research.tte --features .cache/features --traces",
        ".cache/traces3 --catalog ../shared/data/catalog --embedder sdk/train/weights/trace`, "
        f"layer {after['layer']} chosen on",
        f"held-out training products, {after.get('seconds', 0) / 60:.0f} min), validation R@10:",
        "",
        "| | earlier reasoner | stage-3 reasoner |",
        "|---|---|---|",
        *[f"| {TTE_LABELS.get(k, k)} | {v0[k]:.3f} | {v1[k]:.3f} |" for k in TTE_ROWS if k in v0 and k in v1],
        "",
        "The photo+title row is not the mm->mm task of the tables above (photo+title against the mirrored",
        "photo + brand/description, R@10 1.000 with traces off, on both sides and on the catalog side only:",
        "saturated, since both views hold the same photo); it ranks photos for a photo+title TTE_u query.",
        "",
        "The better reasoner's hidden states carry more of the product (TTE_u both sides "
        f"{v0[TTE_ROWS[1]]:.3f} -> {v1[TTE_ROWS[1]]:.3f}),",
        "but a head on a 5M-parameter decoder stays far from the two-model path; the SDK keeps the two models.",
        "",
    ]


GRPO_FROZEN = (  # what the GRPO stage trains, and what it does not
    "Only the reasoner is trained in this stage; the embedder is frozen. The reward's embedder (the",
    "trace-trained model above) gets no gradient and embeds the sampled queries under `torch.no_grad`,",
    "and the catalog-side vectors it compares them with (photo + the supervised reasoner's photo trace)",
    "are computed once, before the first step. MOON3.0 trains the embedder's contrastive loss and the",
    "GRPO reward jointly; that joint update is not done here. The reason is the CPU budget: the trace",
    "embedder is trained separately (`train_embedder --traces`, on cached traces of the supervised",
    "reasoner), and each GRPO run below already takes 7-10 min on 2 cores. So the embedder never adapts",
    "to the GRPO traces, and the shipped reasoner weights stay the supervised ones.",
    "",
)


GRPO_ROWS = (("title, no trace", "text->image R@10, query without trace"),
             ("title + SFT trace", "text->image R@10, SFT query traces"),
             ("title + GRPO trace", "text->image R@10, GRPO query traces"))


def _stage3_grpo(before: dict, after: dict) -> list[str]:
    """GRPO from the earlier reasoner against GRPO from the stage-3 reasoner (same recipe)."""
    v0, v1, c = before["validation"], after["validation"], after["config"]
    return [
        f"GRPO from the stage-3 reasoner, same recipe ({c['steps']} steps, lr {c['lr']}, beta {c['beta']}; "
        "the embedder frozen,",
        "as above), with the retrained trace embedder and the stage-3 photo traces on the catalog side",
        "(`python -m research.grpo --catalog ../shared/data/catalog --features .cache/features --traces",
        ".cache/traces3 --reasoner sdk/train/weights/reasoner --embedder sdk/train/weights/trace --eval`,",
        f"{after['seconds'] / 60:.1f} min), validation text->image R@10:",
        "",
        "| query | earlier reasoner, first trace model | stage-3 reasoner, retrained trace model |",
        "|---|---|---|",
        *[f"| {label} | {v0[k]:.3f} | {v1[k]:.3f} |" for label, k in GRPO_ROWS if k in v0 and k in v1],
        "",
        "GRPO raises its traces over the SFT ones (with either reasoner) but not above the title alone; each",
        "number is one validation run, and differences below about 0.02 are within its noise (binomial",
        "standard error about 0.013 at R@10 0.82).",
        "",
    ]
