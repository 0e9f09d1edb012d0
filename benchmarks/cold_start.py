"""Cold start of an engine, repeated in fresh processes: medians of import -> engine load -> first vector.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cold_start.py moon3.engine --reps 7 --threads 1

Each repetition is a fresh Python process (`sdk.bench.probe_process`), so imports, the engine read
and its checksums and the ONNX Runtime session creation all count. The engine file is read once
before the first repetition, so every repetition reads it from the page cache (a warm disk).

With `--baseline DIR` (a folder holding another version's `sdk/` package, e.g. from
`git archive <commit> sdk | tar -x -C DIR`), each repetition also times that version, alternating
which goes first, so both see the same machine load; the report gives both medians and their ratio.
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


def _probe(probe_process, args, call, out, pythonpath: str) -> dict:
    old = os.environ.get("PYTHONPATH")
    try:
        os.environ["PYTHONPATH"] = pythonpath  # found before the installed (editable) sdk
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
        print(f"{args.engine} [{v}: {versions[v]}]: median of {args.reps} fresh processes "
              f"(threads {args.threads}): " + "  ".join(f"{k} {med[v][k]:.3f}" for k in KEYS))
    if args.baseline:
        print("this / baseline: " + "  ".join(f"{k} {med['this'][k] / med['baseline'][k]:.2f}x" for k in KEYS))
    if args.json:
        Path(args.json).write_text(json.dumps({"engine": args.engine, "median": med, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
