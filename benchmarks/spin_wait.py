"""Spin-waiting of onnxruntime's thread pools in a split engine, measured: the runtime's default
(the image graph's pool does not spin, the text graph's does) against spinning everywhere and
spinning nowhere.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/spin_wait.py moon3.engine --threads 2 --out spin_wait.json

A pool with more than one thread keeps its idle workers spinning for a while after each run. In
a photo + title call the image graph runs and then the text graph: the image pool's spinning
worker takes a core the text pool needs. Each variant runs in a fresh process (the setting is
fixed when a session is made), the variants alternate over `--rounds` rounds, and every call's
vectors are checked against the default's (cosine >= 0.99999: the setting changes timing only).
Medians of each round's median, in ms, for one photo + title, one title, 32 photos + titles and
32 titles (sample products).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("default", "spin everywhere", "spin nowhere")

_PROBE = r"""
import json, sys, time
import numpy as np
import sdk.sessions as S
from sdk.bench import load_inputs
from sdk.embedder import Embedder
a = json.loads(sys.argv[1])
init = S.EngineSessions.__init__
def patched(self, *args, **kw):
    init(self, *args, **kw)
    if a["variant"] == "spin everywhere":
        self.quiet_options = self.options
    elif a["variant"] == "spin nowhere":
        self.options = self.quiet_options
S.EngineSessions.__init__ = patched
emb = Embedder(a["engine"], threads=a["threads"])
images, titles, _ = load_inputs(a["samples"], 32)
calls = {"1 photo + title": ({"images": images[:1], "texts": titles[:1]}, 60),
         "1 title": ({"texts": titles[:1]}, 200),
         "32 photos + titles": ({"images": images, "texts": titles}, 6),
         "32 titles": ({"texts": titles}, 40)}
out, vecs = {}, {}
for name, (kw, n) in calls.items():
    for _ in range(3):
        v = emb.embed(**kw, batch_size=32)
    t = []
    for _ in range(n):
        t0 = time.perf_counter(); emb.embed(**kw, batch_size=32); t.append(time.perf_counter() - t0)
    out[name] = float(np.median(t)) * 1e3
    vecs[name] = v.tolist()
print(json.dumps({"ms": out, "vectors": vecs}))
"""


def _probe(engine: str, variant: str, threads: int) -> dict:
    arg = json.dumps({"engine": engine, "variant": variant, "threads": threads, "samples": str(ROOT / "data" / "samples")})
    res = subprocess.run([sys.executable, "-c", _PROBE, arg], capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise SystemExit(f"the {variant!r} probe failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_engines import provenance

    rounds: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    ref = None
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            got = _probe(args.engine, variant, args.threads)
            if ref is None:
                ref = got["vectors"]
            for call, v in got["vectors"].items():
                a, b = np.asarray(v), np.asarray(ref[call])
                cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                if cos.min() < 0.99999:
                    raise SystemExit(f"{variant}: {call} vectors differ from the first run's (cosine {cos.min():.6f})")
            rounds[variant].append(got["ms"])
            print(f"round {r + 1}, {variant}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in got["ms"].items()))
    med = {v: {call: float(np.median([x[call] for x in rs])) for call in rs[0]} for v, rs in rounds.items()}
    report = {"command": "python benchmarks/spin_wait.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              **provenance(), "threads": args.threads, "rounds": args.rounds, "median_ms": med,
              "vs_default": {v: {c: med[v][c] / med["default"][c] for c in med[v]} for v in VARIANTS}}
    for v in VARIANTS:
        print(f"{v:16s} " + ", ".join(f"{c} {ms:.2f} ms ({report['vs_default'][v][c]:.2f}x)" for c, ms in med[v].items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
