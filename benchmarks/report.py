"""Benchmark report: pytest-benchmark JSON files -> results.json, results.md and PNG plots.

    python benchmarks/report.py benchmarks/results/embedder.json benchmarks/results/peers.json \
        benchmarks/results/reasoner.json --out benchmarks/results

Reads the `extra_info` the suites record (runner, kind, precision, modality, batch, p50/p99,
items/s, cosine to the FP32 reference, cold start, peak RSS). Every ratio is taken between two
benchmarks of the same JSON file, i.e. of the same run: absolute times on a shared machine drift
from run to run, ratios much less. Writes:
  * results.json: every row, the ratios and the targets, with the machine and commit of each run;
  * results.md: the tables (embedder vs teacher, text-only vs peers, cold start, reasoner tokens/s,
    think-then-embed latency vs reasoning budget, targets);
  * latency_vs_batch.png: p50 (and p99) latency against batch size, per modality and runner;
  * fidelity_vs_speed.png: cosine to the FP32 reference against latency / throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

TEACHER = "torch eager fp32 (teacher)"
OURS_TEXT = "moon3 int8"
ST_QUINT8 = "sentence-transformers onnx quint8"
FASTEMBED = "fastembed onnx"
TORCH_REASONER = "torch-eager"
DEFAULT_REASONER = "onnx-int4"  # the reasoner precision `moon3 build` ships

PLAIN = "plain pipeline (PIL + FP32 onnxruntime)"
# (what, target, how to read it) - the speed goals of the embedder
TARGETS = {
    "int8_vs_teacher_b1": ("default engine latency / FP32 torch eager running only the towers the input needs, "
                           "batch 1", 0.15, "<="),
    "text_vs_st_quint8": ("text-only throughput / sentence-transformers ONNX quint8", 2.0, ">="),
    "text_vs_fastembed": ("text-only throughput / fastembed", 4.0, ">="),
    "catalog_vs_plain": ("catalog photo + title items/s at batch 32, decode included, default engine / plain "
                         "pipeline (PIL + the FP32 model in onnxruntime), same threads", 3.0, ">="),
    "cold_start": ("cold start: import sdk -> engine loaded -> first vector (s)", 1.0, "<="),
    "reasoner_decode_vs_torch": ("reasoner decode tokens/s, INT4 engine / torch eager generate", 4.0, ">="),
}


def load_rows(paths: list[Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """pytest-benchmark JSON files -> (one row per benchmark that has a runner, per-run metadata)."""
    rows, meta = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' key)")
        src = Path(path).stem
        mi = data.get("machine_info", {})
        meta[src] = {
            "datetime": data.get("datetime"),
            "cpu": (mi.get("cpu") or {}).get("brand_raw"),
            "cpu_count": (mi.get("cpu") or {}).get("count"),
            "python": mi.get("python_version"),
            "commit": (data.get("commit_info") or {}).get("id"),
            "dirty": (not mi["tree_clean"]) if mi.get("tree_clean") is not None
            else (data.get("commit_info") or {}).get("dirty"),
            "avx512_vnni": mi.get("avx512_vnni"),
            "loadavg": mi.get("loadavg_at_start"),
            "threads": mi.get("bench_threads"),
        }
        for b in data["benchmarks"]:
            info = dict(b.get("extra_info") or {})
            if "runner" not in info:
                continue
            st = b.get("stats") or {}
            row = {"source": src, "name": b.get("name"), "group": b.get("group"), "rounds": st.get("rounds"), **info}
            if "p50_ms" not in row and st.get("median") is not None:
                row["p50_ms"] = st["median"] * 1e3
                row["items_per_s"] = row.get("items", 1) / st["median"]
            rows.append(row)
    return rows, meta


def _find(rows, **want) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def _workload(r) -> str:
    return r.get("workload", "latency")


def targets(rows: list[dict]) -> list[dict]:
    """The speed goals, each measured within one run (one JSON file)."""
    out = []
    for src in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == src]
        for modality in ("image+text", "text", "image"):
            ours = _find(rs, kind="engine", runner="moon3 int8 (cpu)", modality=modality, batch=1)
            ref = _find(rs, kind="teacher", modality=modality, batch=1)
            if ours and ref:
                best = (f"; fastest rounds {ours['min_ms']:.1f} vs {ref['min_ms']:.1f} ms = "
                        f"{ours['min_ms'] / ref['min_ms']:.2f}" if "min_ms" in ours and "min_ms" in ref else "")
                out.append(_target("int8_vs_teacher_b1", ours["p50_ms"] / ref["p50_ms"], src,
                                   f"{modality}: p50 {ours['p50_ms']:.1f} ms vs {ref['p50_ms']:.1f} ms{best}"))
        ours = _find(rs, kind="text-peer", runner=OURS_TEXT, workload="throughput")
        for peer, key in ((ST_QUINT8, "text_vs_st_quint8"), (FASTEMBED, "text_vs_fastembed")):
            p = _find(rs, kind="text-peer", runner=peer, workload="throughput")
            if ours and p:
                out.append(_target(key, ours["items_per_s"] / p["items_per_s"], src,
                                   f"{ours['items_per_s']:.0f} vs {p['items_per_s']:.0f} titles/s"))
        ours = _find(rs, kind="reasoner", runner=DEFAULT_REASONER)
        ref = _find(rs, kind="reasoner", runner=TORCH_REASONER)
        if ours and ref and "decode_tokens_per_s" in ours and "decode_tokens_per_s" in ref:
            best = (f"; least disturbed rounds {ours['decode_tokens_per_s_best'] / ref['decode_tokens_per_s_best']:.2f}x"
                    if "decode_tokens_per_s_best" in ours and "decode_tokens_per_s_best" in ref else "")
            out.append(_target("reasoner_decode_vs_torch", ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"], src,
                               f"{ours['decode_tokens_per_s']:.0f} vs {ref['decode_tokens_per_s']:.0f} decode tokens/s"
                               f"{best}"))
        for threads in sorted({r["threads"] for r in rs if r.get("kind") == "catalog"}):
            ours = _find(rs, kind="catalog", runner="moon3 engine", batch=32, threads=threads)
            plain = _find(rs, kind="catalog", runner=PLAIN, batch=32, threads=threads)
            if ours and plain:
                out.append(_target("catalog_vs_plain", ours["items_per_s"] / plain["items_per_s"], src,
                                   f"{threads} thread(s): {ours['items_per_s']:.1f} vs {plain['items_per_s']:.1f} items/s"))
        for r in rs:
            if (r.get("kind") == "cold-start" and r.get("modality") == "text" and r.get("batch") == 1
                    and r.get("precision", "").startswith("int8")):
                cache = f", engine {r['cache']} in the page cache" if r.get("cache") else ""
                out.append(_target("cold_start", r["cold_start_s"], src,
                                   f"{r['runner']}{cache}: import sdk {r['import_s']:.2f} + load {r['load_s']:.2f} "
                                   f"(onnxruntime import {r.get('ort_import_s', float('nan')):.2f}) + first vector "
                                   f"{r['first_embed_s']:.3f} s; whole process {r['process_s']:.2f} s"))
    return out


def _target(key: str, value: float, src: str, detail: str) -> dict:
    what, goal, op = TARGETS[key]
    met = value <= goal if op == "<=" else value >= goal
    return {"target": key, "what": what, "measured": value, "goal": f"{op} {goal}", "met": met, "run": src,
            "detail": detail}


def _ms(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def markdown(rows: list[dict], meta: dict, tg: list[dict]) -> str:
    lines = ["# Benchmark results", ""]
    for src, m in meta.items():
        load = f", load average {m['loadavg'][0]:.1f} at start" if m.get("loadavg") else ""
        lines.append(f"- run `{src}`: {m['datetime']}, {m['cpu']} ({m['cpu_count']} CPUs{load}), {m['threads']} threads "
                     f"per runner, Python {m['python']}, commit {str(m['commit'])[:10]}"
                     + {True: " (**dirty tree**: not a committed state)", False: " (clean tree)"}.get(m.get("dirty"), ""))
    lines.append("")

    eng = [r for r in rows if r.get("kind") in ("engine", "teacher")]
    if eng:
        lines += ["## Embedder on sample products (p50 / p99 ms; photo decode + preprocessing included)", "",
                  "| modality | batch | moon3 int8 | moon3 fp16 | moon3 fp32 | torch eager teacher "
                  "| int8 speed-up (p50; fastest rounds) "
                  "| int8 items/s | int8 cosine vs teacher (mean / min) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for modality in ("image+text", "text", "image"):
            for batch in sorted({r["batch"] for r in eng if r["modality"] == modality}):
                i8 = _find(eng, runner="moon3 int8 (cpu)", modality=modality, batch=batch)
                f32 = _find(eng, runner="moon3 fp32 (cpu)", modality=modality, batch=batch)
                f16 = _find(eng, runner="moon3 fp16 (cpu)", modality=modality, batch=batch)
                t = _find(eng, kind="teacher", modality=modality, batch=batch)
                cell = lambda r: f"{_ms(r['p50_ms'])} / {_ms(r['p99_ms'])}" if r else "-"  # noqa: E731
                sp = f"{t['p50_ms'] / i8['p50_ms']:.1f}x" if (i8 and t and i8["source"] == t["source"]) else "-"
                if sp != "-" and "min_ms" in i8 and "min_ms" in t:
                    sp += f"; {t['min_ms'] / i8['min_ms']:.1f}x"
                cos = f"{i8['cosine_mean']:.4f} / {i8['cosine_min']:.4f}" if i8 and "cosine_mean" in i8 else "-"
                ips = f"{i8['items_per_s']:.0f}" if i8 else "-"
                lines.append(f"| {modality} | {batch} | {cell(i8)} | {cell(f16)} | {cell(f32)} | {cell(t)} | {sp} | {ips} "
                             f"| {cos} |")
        lines.append("")

    peers = [r for r in rows if r.get("kind") == "text-peer"]
    for src in sorted({r["source"] for r in peers}):
        ps = [r for r in peers if r["source"] == src]
        runners = list(dict.fromkeys(r["runner"] for r in ps))
        batches = sorted({r["batch"] for r in ps if _workload(r) == "latency"})
        thr = {r["runner"]: r for r in ps if _workload(r) == "throughput"}
        ours = thr.get(OURS_TEXT)
        n = next(iter(thr.values()))["items"] if thr else 0
        lines += [f"## Text-only, all-MiniLM-L6-v2 tower, same titles, run `{src}`", "",
                  "| runner | precision | " + " | ".join(f"p50 ms, batch {b}" for b in batches)
                  + f" | titles/s ({n} titles, batches of 32) | moon3 ÷ runner | cosine vs FP32 ref (mean / min) |",
                  "|---|---|" + "---|" * len(batches) + "---|---|---|"]
        for name in runners:
            lat = {r["batch"]: r for r in ps if r["runner"] == name and _workload(r) == "latency"}
            cells = [_ms(lat[b]["p50_ms"]) if b in lat else "-" for b in batches]
            t = thr.get(name)
            any_r = t or next(iter(lat.values()), {})
            ratio = f"{ours['items_per_s'] / t['items_per_s']:.2f}x" if (ours and t) else "-"
            cos = f"{any_r['cosine_mean']:.4f} / {any_r['cosine_min']:.4f}" if "cosine_mean" in any_r else "-"
            tput = f"{t['items_per_s']:.0f}" if t else "-"
            lines.append(f"| {name} | {any_r.get('precision', '-')} | {' | '.join(cells)} | {tput} | {ratio} | {cos} |")
        lines += ["", "moon3 embeds into its 256-d product space (cosine vs the FP32 teacher); the peers into "
                  "MiniLM's 384-d space (cosine vs transformers FP32 + mean pooling).", ""]

    cold = [r for r in rows if r.get("kind") == "cold-start"]
    if cold:
        lines += ["## Cold start and memory (fresh process each, medians)", "",
                  "| engine | call | engine file | import sdk | load engine (of it: import onnxruntime) | first vector "
                  "| cold start | whole process | peak RSS |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in cold:
            ort_s = f" ({r['ort_import_s']:.2f} s)" if "ort_import_s" in r else ""
            frac = r.get("engine_cached_fraction")
            cache = f"{r.get('cache', 'as found')}" + (f" ({frac:.0%} cached)" if frac is not None else "")
            lines.append(f"| {r['runner']}, {r['precision']} | {r['modality']}, batch {r['batch']} | {cache} "
                         f"| {r['import_s']:.2f} s | "
                         f"{r['load_s']:.2f} s{ort_s} | {r['first_embed_s']:.3f} s | **{r['cold_start_s']:.2f} s** | "
                         f"{r['process_s']:.2f} s | {r['peak_rss_mb']:.0f} MiB |")
        lines.append("")

    lines += _catalog_table(rows)
    reasoner = [r for r in rows if r.get("kind") == "reasoner"]
    for src in sorted({r["source"] for r in reasoner}):
        rs = [r for r in reasoner if r["source"] == src]
        lines += [f"## Reasoner greedy generation, run `{src}` (same prompts for every runner)", "",
                  "| runner | precision | prefill tokens/s | decode tokens/s | decode ÷ torch eager (p50; least disturbed) "
                  "| tokens agreeing with torch |",
                  "|---|---|---|---|---|---|"]
        for r in rs:
            sp = (f"{r['decode_speedup_vs_torch']:.2f}x; {r['decode_speedup_vs_torch_best']:.2f}x"
                  if "decode_speedup_vs_torch" in r else "-")
            lines.append(f"| {r['runner']} | {r.get('precision', '-')} | {r.get('prefill_tokens_per_s', float('nan')):.0f} "
                         f"| {r.get('decode_tokens_per_s', float('nan')):.0f} | {sp} "
                         f"| {r.get('token_agreement_vs_torch', float('nan')):.3f} |")
        lines.append("")

    tte = sorted((r for r in rows if r.get("kind") == "think-then-embed"), key=lambda r: (r["source"], r["budget"]))
    if tte:
        lines += ["## Think-then-embed, one product (photo + title), latency vs reasoning budget", "",
                  "| budget (trace tokens) | trace tokens written (mean) | p50 / p99 ms | ÷ embedder alone |",
                  "|---|---|---|---|"]
        for r in tte:
            ratio = f"{r['x_embedder_alone']:.1f}x" if "x_embedder_alone" in r else ("1x" if r["budget"] == 0 else "-")
            lines.append(f"| {r['budget'] or 'off'} | {r.get('trace_tokens', 0.0):.1f} | {_ms(r['p50_ms'])} / "
                         f"{_ms(r.get('p99_ms'))} | {ratio} |")
        lines.append("")

    if tg:
        lines += ["## Targets", "", "| target | goal | measured | met | detail |", "|---|---|---|---|---|"]
        for t in tg:
            lines.append(f"| {t['what']} | {t['goal']} | {t['measured']:.2f} | {'yes' if t['met'] else '**no**'} | "
                         f"{t['detail']} |")
        lines.append("")
    return "\n".join(lines)


def _catalog_table(rows: list[dict]) -> list[str]:
    cat = [r for r in rows if r.get("kind") == "catalog"]
    if not cat:
        return []
    lines = ["## Catalog throughput: photo + title items/s, JPEG decode included", "",
             "| batch | threads | moon3 engine | plain pipeline (PIL + FP32 onnxruntime) | engine ÷ plain "
             "| engine cosine vs teacher (mean / min) |", "|---|---|---|---|---|---|"]
    for batch in sorted({r["batch"] for r in cat}):
        for threads in sorted({r["threads"] for r in cat}):
            e = _find(cat, runner="moon3 engine", batch=batch, threads=threads)
            p = _find(cat, runner=PLAIN, batch=batch, threads=threads)
            ratio = f"{e['items_per_s'] / p['items_per_s']:.2f}x" if e and p else "-"
            cos = f"{e['cosine_mean']:.4f} / {e['cosine_min']:.4f}" if e and "cosine_mean" in e else "-"
            lines.append(f"| {batch} | {threads} | {e['items_per_s']:.1f} | {p['items_per_s']:.1f} | {ratio} | {cos} |"
                         if e and p else f"| {batch} | {threads} | - | - | - | - |")
    return lines + [""]


def plot_catalog(rows: list[dict], path: Path) -> None:
    """Items/s against batch size, one line per runner and thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cat = [r for r in rows if r.get("kind") == "catalog"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in dict.fromkeys(r["runner"] for r in cat):
        for threads in sorted({r["threads"] for r in cat}):
            pts = sorted((r["batch"], r["items_per_s"]) for r in cat if r["runner"] == name and r["threads"] == threads)
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="-" if threads == 1 else "--", label=f"{name}, {threads} thread(s)")
    _batch_axis(ax, "photo + title items/s (decode included)", "catalog throughput", legend=bool(cat))
    _save(fig, path)


def _batch_axis(ax, ylabel: str, title: str, legend: bool) -> None:
    """A panel over batch sizes 1, 8, 32 (log2 x axis)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 8, 32], ["1", "8", "32"])
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image+text", "photo + title"), ("text", "title only"), ("image", "photo only"),
              ("peers", "text-only vs peers (MiniLM)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (key, title) in zip(axes, panels):
        if key == "peers":
            rs = [r for r in rows if r.get("kind") == "text-peer" and _workload(r) == "latency"]
        else:
            rs = [r for r in rows if r.get("kind") in ("engine", "teacher") and r.get("modality") == key]
        for name in dict.fromkeys(r["runner"] for r in rs):
            pts = sorted((r["batch"], r["p50_ms"], r.get("p99_ms", r["p50_ms"])) for r in rs if r["runner"] == name)
            b, p50, p99 = zip(*pts)
            line, = ax.plot(b, p50, marker="o", label=name)
            ax.plot(b, p99, ls=":", color=line.get_color(), alpha=0.7)
        ax.set_yscale("log")
        _batch_axis(ax, "latency per call, ms (solid p50, dotted p99)", title, legend=bool(rs))
    _save(fig, path)


def _scatter(ax, pts, xlabel, ylabel, title) -> None:
    """pts: (x, cosine mean, cosine min, label); a bar down to the min; a legend names the points."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for x, mean, lo, label in pts:
        dot = ax.scatter(x, mean, s=40, zorder=3, label=label)
        ax.vlines(x, lo, mean, color=dot.get_facecolor()[0], alpha=0.6)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.ticklabel_format(axis="y", useOffset=False)
    if pts:
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.2, y=0.2)


def plot_fidelity(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    eng = [r for r in rows if r.get("kind") in ("engine", "teacher") and r.get("batch") == 1
           and r.get("modality") == "image+text" and "cosine_mean" in r]
    _scatter(a, [(r["p50_ms"], r["cosine_mean"], r["cosine_min"], f"{r['runner']}, {r['precision']}") for r in eng],
             "p50 latency, photo + title, batch 1 (ms)", "cosine to the FP32 teacher (mean; bar to min)",
             "embedder: fidelity vs speed per precision / engine")
    peers = [r for r in rows if r.get("kind") == "text-peer" and _workload(r) == "throughput" and "cosine_mean" in r]
    _scatter(b, [(r["items_per_s"], r["cosine_mean"], r["cosine_min"], f"{r['runner']}, {r['precision']}")
                 for r in sorted(peers, key=lambda r: r["items_per_s"])],
             "titles/s (batches of 32)", "cosine to its FP32 reference (mean; bar to min)",
             "text-only: fidelity vs throughput (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(paths: list[Path], out: Path, plots: bool = True) -> dict[str, Path]:
    """Read the JSON files, write results.json / results.md (and the plots) into out -> written paths."""
    rows, meta = load_rows(paths)
    if not rows:
        raise ValueError(f"no benchmark with a runner in {[str(p) for p in paths]} (were they written by benchmarks/?)")
    tg = targets(rows)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "results.json", "md": out / "results.md"}
    written["json"].write_text(json.dumps({"runs": meta, "rows": rows, "targets": tg}, indent=1))
    written["md"].write_text(markdown(rows, meta, tg))
    if plots:
        written["latency_png"] = out / "latency_vs_batch.png"
        written["fidelity_png"] = out / "fidelity_vs_speed.png"
        plot_latency(rows, written["latency_png"])
        plot_fidelity(rows, written["fidelity_png"])
        if any(r.get("kind") == "catalog" for r in rows):
            written["catalog_png"] = out / "catalog_throughput.png"
            plot_catalog(rows, written["catalog_png"])
    return written


def stages_markdown(st: dict) -> str:
    """The per-stage medians of compare_engines.py --json as a table per call."""
    names = [Path(e).name for e in st["engines"]]
    tree = {True: "clean tree", False: "dirty tree"}.get(st.get("tree_clean"), "tree state unknown")
    lines = ["## Where the time goes (one call, medians, ms)", "",
             f"`{st['command']}`: {st['rounds']} alternating calls per engine, one thread, commit "
             f"{str(st.get('commit'))[:10]} ({tree}).", ""]
    for call, c in st["calls"].items():
        a, b = c["ms"]
        parts = ["total", *[k for k in a if k not in ("total", "rest")], "rest"]
        lines += [f"`{call}` (vectors of the two engines: cosine mean {c['cosine_mean']:.4f}, min {c['cosine_min']:.4f}):",
                  "", f"| stage | {names[0]} | {names[1]} |", "|---|---|---|"]
        lines += [f"| {p} | {_ms(a.get(p))} | {_ms(b.get(p))} |" for p in parts]
        lines.append("")
    return "\n".join(lines)


BEGIN, END = "<!-- begin: generated by benchmarks/report.py -->", "<!-- end: generated by benchmarks/report.py -->"


def write_docs_section(page: Path, md: str, out: Path) -> None:
    """Replace the text between BEGIN and END in `page` with the report's tables (its title
    dropped, headings one level down, links to the plots relative to the page).

    Raises:
        ValueError: the page lacks the markers (or has them out of order).
    """
    import os

    text = page.read_text(encoding="utf-8")
    a, b = text.find(BEGIN), text.find(END)
    if a < 0 or b < a:
        raise ValueError(f"{page}: no '{BEGIN}' ... '{END}' section to fill")
    body = [("#" + x if x.startswith("## ") else x) for x in md.splitlines() if not x.startswith("# ")]
    rel = os.path.relpath(out, page.parent)
    plots = [f"![{name}]({rel}/{name}.png)" for name in ("latency_vs_batch", "fidelity_vs_speed", "catalog_throughput")
             if (out / f"{name}.png").is_file()]
    section = "\n".join([BEGIN, f"_Generated from [{rel}/results.json]({rel}/results.json) by `benchmarks/report.py`; "
                                "do not edit by hand._", *body, *plots, ""])
    page.write_text(text[:a] + section + text[b:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pytest-benchmark JSON -> results.json, results.md, PNG plots")
    ap.add_argument("json", nargs="+", type=Path, help="files written with --benchmark-json")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    ap.add_argument("--stages", type=Path, default=None,
                    help="the JSON of benchmarks/compare_engines.py --json: adds the per-stage table")
    ap.add_argument("--docs", type=Path, action="append", default=[],
                    help="a Markdown page whose generated section (between the report's begin/end markers) is "
                         "replaced by the tables (e.g. docs/speed.md; repeatable)")
    args = ap.parse_args(argv)
    written = write_report(args.json, args.out, plots=not args.no_plots)
    if args.stages is not None:
        md = written["md"].read_text().rstrip("\n") + "\n\n" + stages_markdown(json.loads(args.stages.read_text()))
        written["md"].write_text(md)
    for page in args.docs:
        write_docs_section(page, written["md"].read_text(), args.out)
    print(written["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
