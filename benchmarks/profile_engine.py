"""Where an engine's time goes: ONNX Runtime's profiler over `sdk.Embedder.embed` calls, summed
by operator type, next to the time spent outside the graph (photo decode, tokenization).

    .venv/bin/python benchmarks/profile_engine.py moon3.engine --modality text --batch 1 --batch 32

Times are with the profiler on (a few % slower than without). Operator families: Conv (+ its
Clip/Mul/Add activations) is the image tower; MatMulInteger, DynamicQuantizeLinear, MatMul,
LayerNormalization, Erf, Softmax are the text towers (title and trace: MiniLM runs once for each)
and the fusion model.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {  # operator types -> what they are in this graph
    "conv (image tower, fp32)": {"Conv", "FusedConv"},
    "int8 matmul": {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeLinear"},
    "fp32 matmul": {"MatMul", "FusedMatMul", "Gemm"},
}
sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Counted:
    """An ONNX Runtime session that counts its runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def profile(engine: str, modality: str, batch: int, rounds: int, threads: int) -> dict:
    import onnxruntime as ort
    from bench_common import SAMPLES  # the same inputs as the suites

    from sdk.bench import load_inputs, make_call
    from sdk.embedder import Embedder
    from sdk.engine import EngineFile
    from sdk.sessions import session_kwargs

    emb = Embedder(engine, threads=threads)
    images, titles, _ = load_inputs(SAMPLES, batch)
    call = make_call(modality, images, titles)

    def profiled(part: str):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(ROOT / ".cache" / "bench" / f"ort_profile_{part}")
        cpu = ["CPUExecutionProvider"]
        # as the runtime creates it; counted, since a call may run a graph several times (length groups)
        return _Counted(ort.InferenceSession(engine_file.part(part), so, providers=cpu, **session_kwargs(cpu)))

    (ROOT / ".cache" / "bench").mkdir(parents=True, exist_ok=True)
    engine_file = EngineFile.read(engine)
    # Profiling sessions of the same graphs (diagnostics only): a split engine has an image and a
    # text graph (its fusion head runs in NumPy, so it counts as outside the graphs), a one-graph
    # engine one embedder graph.
    runner = emb._runner  # sdk.head.SplitRunner or sdk.runners.GraphRunner (sdk.runners.open_runner)
    if hasattr(runner, "image_session"):
        parts = emb.manifest["embedder"]["parts"]
        runner.image_session = profiled(parts["image"])
        runner.text_session = profiled(parts["text"])
        sessions = [runner.image_session, runner.text_session]
    else:
        runner.session = profiled(emb.manifest["embedder"].get("part") or emb.manifest["embedder"]["parts"]["embedder"])
        sessions = [runner.session]
    for _ in range(2):
        emb.embed(**call, batch_size=batch)
    warm_runs = [sess.runs for sess in sessions]
    t0 = time.perf_counter()
    for _ in range(rounds):  # the same calls the profile covers: graph time and wall time agree
        emb.embed(**call, batch_size=batch)
    total = (time.perf_counter() - t0) / rounds
    run_us = 0.0
    by_op: collections.Counter = collections.Counter()
    for sess, warm in zip(sessions, warm_runs):
        prof = Path(sess.session.end_profiling())
        trace = json.loads(prof.read_text())
        prof.unlink()
        runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"][warm:]  # the timed calls'
        run_us += sum(e["dur"] for e in runs) / rounds
        start = runs[0]["ts"] if runs else float("inf")
        for e in trace:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                by_op[e["args"]["op_name"]] += e["dur"]
    ops_ms = {op: us / rounds / 1e3 for op, us in by_op.most_common()}
    kernel = sum(ops_ms.values()) or 1.0
    share = {fam: sum(ms for op, ms in ops_ms.items() if op in members) / kernel for fam, members in FAMILIES.items()}
    share["other"] = 1.0 - sum(share.values())
    return {"modality": modality, "batch": batch, "embed_ms": total * 1e3, "graph_ms": run_us / 1e3,  # graphs
            # outside: decode, preprocessing, tokenization and, for a split engine, the NumPy fusion head
            "outside_graph_ms": total * 1e3 - run_us / 1e3, "kernel_share": share, "ops_ms": ops_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--modality", action="append", choices=("image+text", "text", "image"))
    ap.add_argument("--batch", action="append", type=int)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = []
    for m in args.modality or ["text"]:
        for b in args.batch or [1, 32]:
            r = profile(args.engine, m, b, args.rounds, args.threads)
            out.append(r)
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(r["ops_ms"].items())[:6])
            fam = ", ".join(f"{k} {v:.0%}" for k, v in r["kernel_share"].items())
            print(f"{m:10s} batch {b:3d}: embed {r['embed_ms']:.1f} ms = graph {r['graph_ms']:.1f} ms + outside "
                  f"{r['outside_graph_ms']:.1f} ms\n    kernel time: {fam}\n    top ops (ms): {top}")
    if args.json:
        from sdk.engine import EngineFile

        with EngineFile.open(args.engine) as engine:  # the manifest only: no part is read or hashed
            manifest = engine.manifest
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/profile_engine.py " + " ".join(sys.argv[1:]),
            "precision": manifest["embedder"].get("precision"), "threads": args.threads, "rounds": args.rounds,
            "profiled": "ONNX Runtime's profiler on (a few % slower than without; more for graphs of many small ops)",
            "runs": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
