"""Cold start of an engine, repeated in fresh processes: medians of import -> engine load -> first vector.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cold_start.py moon3.engine --reps 7 --threads 1

Each repetition is a fresh Python process (`sdk.bench.probe_process`), so imports, the engine read
and its checksums and the ONNX Runtime session creation all count. The engine file is read once
before the first repetition, so every repetition reads it from the page cache (a warm disk).

With `--baseline DIR` (a folder holding another version's `sdk/` package, e.g. from
`git archive <commit> sdk | tar -x -C DIR`), each repetition also times that version, alternating
which goes first, so both see the same machine load; the report gives both medians and their ratio.
`--pipeline` times `sdk.Pipeline(complete_title=True)` instead (see the flag's help).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

KEYS = ("import_s", "load_s", "first_embed_s", "cold_start_s", "process_s", "peak_rss_mb")


# `sdk.Pipeline(complete_title=True)` in a fresh process, embedding items that all have a title
# (nothing to generate); the keys of sdk.bench's probe.
_PIPELINE_PROBE = r"""
import time
t0 = time.perf_counter()
import json, sys, warnings
from sdk.pipeline import Pipeline
warnings.simplefilter("ignore")
t_import = time.perf_counter()
a = json.loads(sys.argv[1])
p = Pipeline(a["engine"], complete_title=True, threads=a["threads"])
t_load = time.perf_counter()
v = p.embed(**a["call"])
t_first = time.perf_counter()
import numpy
numpy.save(a["out"], v)
peak_kb = int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM:")).split()[1])
print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "first_embed_s": t_first - t_load,
                  "cold_start_s": t_first - t0, "peak_rss_mb": peak_kb / 1024}))
"""


def _probe_pipeline(engine: str, call: dict, out: Path, threads: int) -> dict:
    import subprocess
    import time

    arg = json.dumps({"engine": engine, "call": call, "out": str(out), "threads": threads})
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _PIPELINE_PROBE, arg], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"the pipeline probe failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - t0}


def _probe(probe_process, args, call, out, pythonpath: str) -> dict:
    old = os.environ.get("PYTHONPATH")
    try:
        os.environ["PYTHONPATH"] = pythonpath  # found before the installed (editable) sdk
        if args.pipeline:
            return _probe_pipeline(args.engine, call, out, args.threads)
        return probe_process(args.engine, call, 1, threads=args.threads, out=out)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def main(argv: list[str] | None = None) -> int:
    from sdk.bench import probe_process

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text", default="Puma Men Blue T-shirt", help="the query embedded after the load")
    ap.add_argument("--image", default=None, help="embed this photo with the text (default: text only)")
    ap.add_argument("--pipeline", action="store_true", help="time sdk.Pipeline(complete_title=True) instead of "
                    "sdk.Embedder, on items that all have a title (the reasoner has nothing to write)")
    ap.add_argument("--baseline", default=None, help="folder with another version's sdk/ to time alternately")
    ap.add_argument("--json", default=None, help="write every repetition and the medians here")
    args = ap.parse_args(argv)

    Path(args.engine).read_bytes()  # into the page cache: every repetition sees a warm disk
    call = {"texts": [args.text]} | ({"images": [args.image]} if args.image else {})
    out = Path(tempfile.mkdtemp(prefix="moon3-cold-")) / "probe.npy"
    # The probes run in an empty folder with PYTHONPATH set, so `import sdk` finds the version meant
    # (not a checkout in the working directory).
    versions = {"this": str(Path(__file__).resolve().parents[1])}
    versions |= {"baseline": str(Path(args.baseline).resolve())} if args.baseline else {}
    args.engine = str(Path(args.engine).resolve())
    if args.image:
        call["images"] = [str(Path(args.image).resolve())]
    here = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="moon3-cold-"))
    runs: dict[str, list[dict]] = {v: [] for v in versions}
    vectors: dict[str, np.ndarray] = {}
    try:
        for r in range(args.reps):
            order = list(versions) if r % 2 == 0 else list(versions)[::-1]
            for version in order:
                p = _probe(probe_process, args, call, out, versions[version])
                v = np.load(out)
                # the vector timed is a real one: finite, unit length; and both versions agree
                if v.shape[0] != 1 or not np.isfinite(v).all() or abs(float(np.linalg.norm(v[0])) - 1) > 1e-3:
                    raise SystemExit(f"{version} repetition {r}: the probe's vector is not a unit vector: {v.shape}")
                if vectors and not np.allclose(next(iter(vectors.values())), v, atol=1e-5):
                    raise SystemExit(f"{version} repetition {r}: the vector differs from the other runs")
                vectors.setdefault(version, v)
                runs[version].append(p)
                print(f"rep {r} {version}: " + "  ".join(f"{k} {p[k]:.3f}" for k in KEYS), file=sys.stderr, flush=True)
    finally:
        out.unlink(missing_ok=True)
        os.chdir(here)
    med = {v: {k: statistics.median(p[k] for p in runs[v]) for k in KEYS} for v in versions}
    for v in versions:
        what = " Pipeline(complete_title=True)" if args.pipeline else ""
        print(f"{args.engine} [{v}: {versions[v]}]{what}: median of {args.reps} fresh processes "
              f"(threads {args.threads}): " + "  ".join(f"{k} {med[v][k]:.3f}" for k in KEYS))
    if args.baseline:
        print("this / baseline: " + "  ".join(f"{k} {med['this'][k] / med['baseline'][k]:.2f}x" for k in KEYS))
    if args.json:
        Path(args.json).write_text(json.dumps({"engine": args.engine, "median": med, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
