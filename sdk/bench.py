"""Pure-runtime benchmark of a `moon3.engine` (numpy + onnxruntime, never torch): `moon3 bench`.

    moon3 bench moon3.engine                         # 3 modalities x batch 1/8/32, cold start, peak RSS
    moon3 bench moon3.engine --modality text --batch 1 --rounds 200 --json bench.json

What it measures, per modality ("image+text", "text", "image") and batch size:
  * latency of one `Embedder.embed` call on real inputs (photo decode + preprocessing +
    tokenization + ONNX Runtime), p50 and p99 over the timed rounds, after warm-up calls;
    p99 is the nearest-rank value, so with fewer than 100 rounds it is the slowest round;
  * throughput: items per second at the median latency;
  * that the timed vectors are the right ones: each timed call's rows against the same items
    embedded one by one (cosine; batching, padding and length-sorting must not change them).
When the engine has a reasoner: its greedy prefill and decode tokens/s on trace prompts
(`bench_reasoner`); when its embedder was also trained with traces: think-then-embed latency of
one product (photo + title) against the reasoning budget (`bench_think_then_embed`). And, in a
fresh Python process each (so imports count): cold start (`import sdk` -> engine loaded -> first
vector) and the process's peak RSS after a warm call.

Inputs are the photos and titles of `--samples` (a folder with items.jsonl, e.g. the
repository's data/samples); with none, synthetic photos (noise) and titles are used.
The full benchmark suite with the PyTorch teacher and peer libraries is `benchmarks/` (pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sdk.errors import SdkError, TruncationWarning

__all__ = ["MODALITIES", "TTE_BUDGETS", "bench_reasoner", "bench_think_then_embed", "latency_stats", "load_inputs",
           "make_call", "probe_process", "run_bench", "time_calls"]

MODALITIES = ("image+text", "text", "image")
TTE_BUDGETS = (0, 16, 32, 64)  # reasoning-token budgets of `bench_think_then_embed` (0: reason="off")


_WORDS = ("Men", "Women", "Black", "White", "Red", "Blue", "Running", "Casual", "Leather", "Cotton", "Shoes",
          "T-shirt", "Watch", "Handbag", "Jeans", "Dress", "Sports", "Analog", "Slim", "Fit")


def load_inputs(samples: str | os.PathLike | None = None, n: int = 32) -> tuple[list[Any], list[str], str]:
    """n (photo, title) pairs -> (images, titles, source label).

    Products with a photo from `samples`/items.jsonl, repeated in order if fewer than n; with no
    folder (or no products with photos in it), synthetic 256x256 noise photos and titles.

    Raises:
        FileNotFoundError: `samples` was given but has no items.jsonl.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if samples is not None:
        root = Path(samples)
        src = root / "items.jsonl"
        if not src.is_file():
            raise FileNotFoundError(f"no items.jsonl in {root} (expected a catalog folder like data/samples)")
        items = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
        pairs = [(root / it["image"], it["title"]) for it in items if it.get("image") and it.get("title")]
        if pairs:
            pairs = [pairs[i % len(pairs)] for i in range(n)]
            return [p for p, _ in pairs], [t for _, t in pairs], str(root)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(n)]
    titles = [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 8)))) for _ in range(n)]
    return images, titles, "synthetic"


def make_call(modality: str, images: Sequence[Any], titles: Sequence[str]) -> dict[str, list[Any]]:
    """The `embed` keyword arguments of one modality for these items."""
    if modality == "image+text":
        return {"images": list(images), "texts": list(titles)}
    if modality == "text":
        return {"texts": list(titles)}
    if modality == "image":
        return {"images": list(images)}
    raise ValueError(f"unknown modality {modality!r}; choose from {list(MODALITIES)}")


def time_calls(fn: Callable[[], Any], rounds: int, warmup: int = 2) -> tuple[np.ndarray, Any]:
    """Call fn warmup + rounds times -> (seconds of each timed call, the last result)."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    out = None
    for _ in range(warmup):
        out = fn()
    times = np.empty(rounds)
    for r in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times[r] = time.perf_counter() - t0
    return times, out


def latency_stats(times: Sequence[float], items: int) -> dict[str, float]:
    """Per-call seconds -> p50/p99/mean/min in ms and items/s at the median."""
    t = np.asarray(times, dtype=np.float64)
    if t.size == 0 or items < 1:
        raise ValueError("need at least one timing and one item")
    p50 = float(np.median(t))
    return {
        "rounds": int(t.size),
        "p50_ms": p50 * 1e3,
        "p99_ms": float(np.percentile(t, 99, method="inverted_cdf")) * 1e3,  # nearest rank
        "mean_ms": float(t.mean()) * 1e3,
        "min_ms": float(t.min()) * 1e3,
        "items_per_s": items / p50,
    }


# Runs in a fresh interpreter: the clock starts before `import sdk`, so imports count.
_PROBE = r"""
import time
t0 = time.perf_counter()
import json, resource, sys, warnings
from sdk.embedder import Embedder
warnings.simplefilter("ignore")
t_import = time.perf_counter()
import onnxruntime
t_ort = time.perf_counter()
a = json.loads(sys.argv[1])
emb = Embedder(a["engine"], providers=a["providers"], threads=a["threads"])
t_load = time.perf_counter()
v = emb.embed(**a["call"], batch_size=a["batch"])
t_first = time.perf_counter()
emb.embed(**a["call"], batch_size=a["batch"])
t_second = time.perf_counter()
if a["out"]:
    import numpy
    numpy.save(a["out"], v)
try:  # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec)
    peak_kb = int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM:")).split()[1])
except (OSError, StopIteration):
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({
    "import_s": t_import - t0, "ort_import_s": t_ort - t_import, "load_s": t_load - t_import,
    "first_embed_s": t_first - t_load,
    "cold_start_s": t_first - t0, "warm_embed_s": t_second - t_first, "shape": list(v.shape),
    "peak_rss_mb": peak_kb / 1024,
    "backend": emb.backend, "precision": emb.precision,
}))
"""


def probe_process(
    engine: str | os.PathLike,
    call: dict[str, list[Any]],
    batch: int,
    *,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    python: str = sys.executable,
    timeout: float = 300.0,
    out: str | os.PathLike | None = None,
    cache: str | None = None,
) -> dict[str, Any]:
    """Cold start and peak RSS of embedding `call` in a fresh Python process.

    `cache` sets the engine file's page-cache state first: "cold" evicts it (`sdk.pagecache.evict`:
    the engine is read from disk, the interpreter and libraries stay cached), "warm" reads it
    whole (a restart of a process that ran moments ago); None leaves it as it is. The result's
    `cache` and `engine_cached_fraction` (mincore, just before the process starts) say which it was.

    Returns the probe's JSON (import_s, load_s (onnxruntime import, engine read + checksums,
    session creation; ort_import_s of it is the import), first_embed_s, cold_start_s = import sdk ->
    first vector, warm_embed_s, peak_rss_mb, backend, precision) plus process_s, the wall time of
    the whole process (interpreter start and exit included). Images must be paths. With `out`,
    the probe saves the first call's vectors there (.npy), to check them.

    Raises:
        RuntimeError: the probe process failed (its stderr is in the message).
    """
    from sdk.pagecache import cached_fraction, evict

    for img in call.get("images", []):
        if not isinstance(img, (str, os.PathLike)):
            raise ValueError("probe_process needs image paths (the call is sent to another process as JSON)")
    if cache not in (None, "cold", "warm"):
        raise ValueError(f"cache must be 'cold', 'warm' or None, got {cache!r}")
    if cache == "cold":
        evict(engine)
    elif cache == "warm":
        with open(engine, "rb") as f:
            while f.read(1 << 24):
                pass
    fraction = cached_fraction(engine)
    arg = json.dumps({
        "engine": str(engine), "providers": list(providers), "threads": threads, "batch": batch,
        "out": str(out) if out is not None else None,
        "call": {k: [str(x) for x in v] for k, v in call.items()},
    })
    t0 = time.perf_counter()
    res = subprocess.run([python, "-c", _PROBE, arg], capture_output=True, text=True, timeout=timeout)
    process_s = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"the cold-start probe failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out.update(process_s=process_s, cache=cache or "as found", engine_cached_fraction=fraction)
    return out


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def bench_reasoner(engine: str | os.PathLike, titles: Sequence[str], *, rounds: int = 5, warmup: int = 1,
                   threads: int | None = None, max_new_tokens: int = 64,
                   providers: Sequence[str] | None = None) -> dict[str, Any]:
    """Greedy generation speed of an engine's reasoner (`sdk.Reasoner`), title-only trace prompts.

    Each round generates a trace for every title; prefill and decode tokens/s come from the
    runtime's own split (`Reasoner.last_stats`), at the round with the median total time. The
    tokens of every round must equal the first round's (greedy decoding is deterministic).
    """
    from sdk.reasoner import Reasoner

    if rounds < 1 or warmup < 0 or not titles:
        raise ValueError(f"need rounds >= 1, warmup >= 0 and titles, got rounds={rounds}, warmup={warmup}")
    r = Reasoner(engine, threads=threads, providers=providers)

    def one_round():
        out, pre, dec, n_prompt = [], 0.0, 0.0, 0
        for t in titles:
            out.append(r.generate_ids(text=t, task="trace", max_new_tokens=max_new_tokens))
            st = r.last_stats
            pre, dec, n_prompt = pre + st["prefill_s"], dec + st["decode_s"], n_prompt + st["prompt_tokens"]
        return out, pre, dec, n_prompt

    for _ in range(warmup):
        one_round()
    runs = [one_round() for _ in range(rounds)]
    if any(x[0] != runs[0][0] for x in runs):
        raise SdkError("the reasoner gave different tokens for the same prompts (greedy decoding must not)")
    out, pre, dec, n_prompt = sorted(runs, key=lambda x: x[1] + x[2])[len(runs) // 2]
    n_new = sum(map(len, out))
    return {"precision": r.precision, "prompts": len(titles), "prompt_tokens": n_prompt, "new_tokens": n_new,
            "prefill_tokens_per_s": n_prompt / max(pre, 1e-9),
            # every new token but each answer's first comes from one decode step
            "decode_tokens_per_s": (n_new - len(out)) / max(dec, 1e-9), "rounds": rounds}


def bench_think_then_embed(engine: str | os.PathLike, images: Sequence[Any], titles: Sequence[str], *,
                           budgets: Sequence[int] = TTE_BUDGETS, rounds: int = 5, warmup: int = 1,
                           threads: int | None = None, providers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Latency of `sdk.Pipeline(reason="on", max_trace_tokens=budget)` on one product per call
    (photo + title, cycling through the given ones; no trace cache, so every call generates),
    per budget; budget 0 is `reason="off"`, the embedder alone, the baseline of `x_embedder_alone`.
    Each budget's last vector must equal a fresh pipeline's for the same item (greedy decoding is
    deterministic).

    Raises:
        SdkError: a timed vector differs from the fresh pipeline's.
    """
    from sdk.pipeline import Pipeline

    if not images or len(images) != len(titles) or any(b < 0 for b in budgets):
        raise ValueError(f"need one title per photo and budgets >= 0, got {len(images)} photos, "
                         f"{len(titles)} titles, budgets {list(budgets)}")
    rows: list[dict[str, Any]] = []
    for budget in budgets:
        def pipeline(budget=budget) -> Pipeline:  # the timed one and the fresh one that checks it
            return Pipeline(engine, reason="on" if budget else "off", max_trace_tokens=max(budget, 1), threads=threads,
                            providers=providers)

        pipe = pipeline()
        _ = pipe.reasoner  # loaded before timing, whatever the warm-up
        state = {"i": 0, "tokens": []}

        def one():
            i = state["i"] % len(images)
            state["i"] += 1
            v = pipe.embed([images[i]], [titles[i]])
            if budget:
                state["tokens"].append(pipe.reasoner.last_stats.get("new_tokens", 0))
            return v

        try:
            times, v = time_calls(one, rounds, warmup)
        finally:
            pipe.close()
        i = (state["i"] - 1) % len(images)
        fresh = pipeline()
        try:
            again = fresh.embed([images[i]], [titles[i]])
        finally:
            fresh.close()
        if float(_cosine_rows(v, again).min()) < 0.99999:
            raise SdkError(f"think-then-embed, budget {budget}: the timed vector differs from a fresh pipeline's")
        rows.append({"budget": budget, **latency_stats(times, 1),
                     "trace_tokens": float(np.mean(state["tokens"])) if state["tokens"] else 0.0})
    alone = next((r["p50_ms"] for r in rows if r["budget"] == 0), None)
    for r in rows:
        if r["budget"] and alone:
            r["x_embedder_alone"] = r["p50_ms"] / alone
    return rows


def _latency_rows(emb, m: str, images: list, titles: list, batches: Sequence[int], rounds: int, warmup: int,
                  log) -> list[dict[str, Any]]:
    """Latency of one modality per batch size, each timed call's vectors checked against the same
    items embedded one at a time."""
    rows = []
    # One item at a time is the reference the timed (batched, length-sorted) vectors must match.
    n_ref = max(batches)
    ref = emb.embed_batch(**make_call(m, images[:n_ref], titles[:n_ref]), batch_size=1)
    if ref.errors:
        raise SdkError(f"the benchmark inputs could not be embedded: {ref.errors}")
    for b in batches:
        call = make_call(m, images[:b], titles[:b])
        with warnings.catch_warnings():  # truncation is counted once below, not warned per timed call
            warnings.simplefilter("ignore", TruncationWarning)
            times, v = time_calls(lambda: emb.embed(**call, batch_size=b), rounds, warmup)
        row = {"modality": m, "batch": b, **latency_stats(times, b),
               "cosine_min_vs_unbatched": float(_cosine_rows(v, ref.vectors[:b]).min()),
               "truncated_items": sum(1 for i in ref.truncated if i < b)}
        rows.append(row)
        if log:
            log(f"{m:10s} batch {b:3d}: p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  "
                f"{row['items_per_s']:8.1f} items/s  cos>= {row['cosine_min_vs_unbatched']:.5f}")
    return rows


def _cold_starts(engine, images: list, titles: list, batches: Sequence[int], providers, threads, log) -> list[dict]:
    """A fresh process per (modality, batch, page cache): import, load and first-vector times, peak
    memory; the engine file evicted from the page cache ("cold") and then read ("warm")."""
    out: list[dict] = []
    for m, b, cache in (("text", 1, "cold"), ("text", 1, "warm"), ("image+text", max(batches), "warm")):
        if "image" in m and not images:
            continue
        p = probe_process(engine, make_call(m, images[:b], titles[:b]), b, providers=providers, threads=threads,
                          cache=cache)
        out.append({"modality": m, "batch": b, **p})
        if log:
            log(f"fresh process, {m} batch {b}, engine {cache} in the page cache: cold start {p['cold_start_s']:.3f} s "
                f"(import {p['import_s']:.3f}, "
                f"load {p['load_s']:.3f}, first vector {p['first_embed_s']:.3f}); whole process "
                f"{p['process_s']:.3f} s; peak RSS {p['peak_rss_mb']:.0f} MiB")
    return out


def run_bench(
    engine: str | os.PathLike,
    *,
    modalities: Sequence[str] = MODALITIES,
    batches: Sequence[int] = (1, 8, 32),
    rounds: int = 20,
    warmup: int = 2,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    samples: str | os.PathLike | None = None,
    cold_start: bool = True,
    reasoner: bool = True,
    think_then_embed: bool = True,
    budgets: Sequence[int] = TTE_BUDGETS,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark an engine through `sdk.Embedder` (and `sdk.Reasoner` when the engine has one and
    `reasoner`; `sdk.Pipeline` think-then-embed per budget in `budgets` when its embedder was
    trained with traces and `think_then_embed`) -> a JSON-ready report (see the module doc)."""
    from sdk.embedder import Embedder
    from sdk.version import __version__

    for m in modalities:
        make_call(m, [], [])  # rejects unknown names before any work
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
    images, titles, source = load_inputs(samples, max(batches))
    emb = Embedder(engine, providers=list(providers), threads=threads)
    import onnxruntime

    report: dict[str, Any] = {
        "engine": str(engine), "precision": emb.precision, "backend": emb.backend, "providers": list(emb.providers),
        "threads": threads, "inputs": source, "rounds": rounds, "warmup": warmup,
        "versions": {"moon3-sdk": __version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "latency": [], "process": [],
    }
    report["latency"] = [row for m in modalities for row in _latency_rows(emb, m, images, titles, batches, rounds,
                                                                        warmup, log)]
    from sdk.engine import EngineFile

    manifest = EngineFile.read(engine).manifest
    if reasoner and "reasoner" in manifest:
        reasoner_titles = load_inputs(samples, 4)[1]  # a few prompts, whatever the batch sizes
        rs = bench_reasoner(engine, reasoner_titles, rounds=max(1, min(rounds, 5)), warmup=min(warmup, 1), threads=threads,
                            providers=providers)
        report["reasoner"] = rs
        if log:
            log(f"reasoner ({rs['precision']}), {rs['prompts']} trace prompts: prefill {rs['prefill_tokens_per_s']:.0f} "
                f"tok/s, decode {rs['decode_tokens_per_s']:.0f} tok/s ({rs['new_tokens']} new tokens)")
    if think_then_embed and "reasoner" in manifest and manifest.get("embedder", {}).get("trace_trained"):
        tte = bench_think_then_embed(engine, images[:4], titles[:4], budgets=budgets, rounds=max(1, min(rounds, 5)),
                                     warmup=min(warmup, 1), threads=threads, providers=providers)
        report["think_then_embed"] = tte
        if log:
            for r in tte:
                x = f" ({r['x_embedder_alone']:.1f}x the embedder alone)" if "x_embedder_alone" in r else ""
                log(f"think-then-embed, budget {r['budget']:3d}: p50 {r['p50_ms']:8.2f} ms, "
                    f"{r['trace_tokens']:.1f} trace tokens{x}")
    if cold_start:
        report["process"] = _cold_starts(engine, [] if source == "synthetic" else images, titles, batches, providers,
                                         threads, log)
    return report
