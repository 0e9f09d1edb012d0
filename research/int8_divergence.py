"""Where a quantized engine's vectors part between two CPU architectures, and what it costs search.

    python -m research.int8_divergence --engine moon3.engine --engine fp32.engine \\
        --other .cache/wheels/aarch64/python --out docs/results/int8_divergence.json
    python -m research.int8_divergence --render docs/results/int8_divergence.json   # the table

`--other` is an interpreter of the other architecture with the runtime's requirements installed
(`scripts/build_wheels.sh` leaves one: an emulated aarch64 Python 3.11); this checkout's `sdk` is
put on its path. For each engine, both interpreters run:

- the engine's text graph with every intermediate tensor as an output (graph optimisations off,
  so each tensor is one op's), on the sample titles: the first tensor, in graph order, that differs
  between the two, how many elements of each quantized tensor differ, and the pooled token states'
  cosine at the end;
- `sdk.Embedder(engine).embed(texts=titles)` and, on the host only, the photos: each title's vector
  against the other architecture's (cosine), and title -> photo search with the other
  architecture's title vectors against the host's photo vectors (R@1 / R@10, relevant: the same
  product), beside the host's own titles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _worker(engine: str, dump_graph: str, titles_file: str, out: str) -> None:
    """Run in each interpreter: the intermediate tensors and the title vectors of `engine`."""
    import onnxruntime as ort

    from sdk import Embedder

    titles = json.loads(Path(titles_file).read_text())
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(dump_graph, so, providers=["CPUExecutionProvider"])
    feed = dict(np.load(Path(dump_graph).with_suffix(".feed.npz")))
    names = [o.name for o in sess.get_outputs()]
    tensors = sess.run(names, feed)
    with Embedder(engine, threads=1) as e:
        vec = e.embed(texts=titles)
    np.savez(out, vectors=vec, names=np.array(names), **{f"t{i}": t for i, t in enumerate(tensors)})


def _dump_graph(engine: str, titles: list[str], folder: Path, batch: int) -> Path:
    """The engine's text graph with every op's output exposed, and a feed of the first titles."""
    import onnx

    from sdk.engine import EngineFile

    eng = EngineFile.read(engine)
    model = onnx.load_from_string(eng.part("text.onnx"))
    seen = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for o in node.output:
            if o and o not in seen:
                model.graph.output.append(onnx.ValueInfoProto(name=o))
                seen.add(o)
    path = folder / (Path(engine).stem + ".dump.onnx")
    onnx.save(model, path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(eng.part("tokenizer.json").decode())
    enc = tok.encode_batch(titles[:batch])
    T = max(len(x.ids) for x in enc)
    ids, mask = np.zeros((len(enc), T), np.int64), np.zeros((len(enc), T), np.int64)
    for i, x in enumerate(enc):
        ids[i, : len(x.ids)], mask[i, : len(x.ids)] = x.ids, 1
    np.savez(path.with_suffix(".feed.npz"), input_ids=ids, attention_mask=mask)
    return path


def _graph_order(dump: Path) -> list[tuple[str, str]]:
    """(tensor, op type) of every op output, in the graph's (topological) order."""
    import onnx

    return [(o, n.op_type) for n in onnx.load(dump).graph.node for o in n.output if o]


def compare(host: dict, other: dict, order: list[tuple[str, str]], mask: np.ndarray) -> dict:
    """In graph order: the first tensor that differs, the first quantized (8-bit) tensor that does
    and the share of the last quantized tensor's elements that differ; the end's pooled cosine."""
    index = {str(n): i for i, n in enumerate(host["names"])}
    first = first_q = last_q = None
    n_q = 0
    for name, op in order:
        a, b = host[f"t{index[name]}"], other[f"t{index[name]}"]
        if a.shape != b.shape:
            continue
        diff = a != b
        entry = {"tensor": name, "op": op, "dtype": str(a.dtype), "elements": int(a.size),
                 "differing": round(float(diff.mean()), 6),
                 "max_abs_diff": float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())}
        if diff.any() and first is None:
            first = entry
        if a.dtype in (np.uint8, np.int8) and a.size > 1:
            n_q += 1
            last_q = entry
            if diff.any() and first_q is None:
                first_q = entry
    end = index["token_states"]
    pooled = [(t[f"t{end}"] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True) for t in (host, other)]
    cos = (pooled[0] * pooled[1]).sum(1) / np.linalg.norm(pooled[0], axis=1) / np.linalg.norm(pooled[1], axis=1)
    return {"first_difference": first, "first_quantized_difference": first_q, "quantized_tensors": n_q,
            "last_quantized_tensor": last_q, "pooled_token_states_cosine_min": round(float(cos.min()), 6)}


def render(report: dict) -> str:
    """The report as a markdown table, one column per engine."""
    engines = report["engines"]
    a = report["architectures"]

    def q(g, key):
        e = g.get(key)
        return "none" if e is None else f"{100 * e['differing']:.3g} % of `{e['tensor']}` ({e['op']})"

    rows = [
        ("precision", lambda e: e["precision"]),
        ("first tensor that differs", lambda e: "none" if e["graph"]["first_difference"] is None else
         f"`{e['graph']['first_difference']['tensor']}` ({e['graph']['first_difference']['op']}), "
         f"max abs {e['graph']['first_difference']['max_abs_diff']:.2g}"),
        ("first quantized tensor that differs", lambda e: q(e["graph"], "first_quantized_difference")),
        ("last quantized tensor, elements differing", lambda e: q(e["graph"], "last_quantized_tensor")),
        ("title vectors, cosine min / mean", lambda e: f"{e['title_vector_cosine']['min']:.5f} / "
                                                      f"{e['title_vector_cosine']['mean']:.5f}"),
        (f"title -> photo R@1 / R@10, {a['host']} titles", lambda e: "{R@1:.3f} / {R@10:.3f}".format(
            **e["title->photo"]["host titles"])),
        (f"title -> photo R@1 / R@10, {a['other']} titles", lambda e: "{R@1:.3f} / {R@10:.3f}".format(
            **e["title->photo"]["other titles"])),
    ]
    lines = ["| | " + " | ".join(f"`{n}`" for n in engines) + " |", "|---" * (len(engines) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(fn(e) for e in engines.values()) + " |" for label, fn in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m research.int8_divergence", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", action="append", required=True, help="an engine file (repeatable)")
    ap.add_argument("--other", required=True, help="the other architecture's Python (a command)")
    ap.add_argument("--samples", default=str(ROOT / "data" / "samples"), help="products: items.jsonl + images")
    ap.add_argument("--limit", type=int, default=0, help="first N products (0: all)")
    ap.add_argument("--dump-batch", type=int, default=4, help="titles in the per-op comparison")
    ap.add_argument("--out", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # one interpreter's run: ENGINE DUMP TITLES OUT
        return _worker(*argv[1:5])
    if argv[:1] == ["--render"]:
        return print(render(json.loads(Path(argv[1]).read_text())))
    args = ap.parse_args(argv)
    from sdk import Embedder
    from sdk.train.metrics import recall_at_k

    items = [json.loads(line) for line in (Path(args.samples) / "items.jsonl").read_text().splitlines() if line.strip()]
    items = [it for it in items if it.get("title") and it.get("image")][: args.limit or None]
    titles = [it["title"] for it in items]
    photos = [str(Path(args.samples) / it["image"]) for it in items]
    report = {"command": "python -m research.int8_divergence " + " ".join(argv),
              "products": len(items), "engines": {}}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pythons = {"host": [sys.executable], "other": args.other.split()}
    same = np.arange(len(items))  # a title's relevant photo: its own product's
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "titles.json").write_text(json.dumps(titles))
        report["architectures"] = {
            label: subprocess.run([*py, "-c", "import platform; print(platform.machine())"], capture_output=True,
                                  text=True, env=env, check=True).stdout.strip() for label, py in pythons.items()}
        for engine in args.engine:
            dump = _dump_graph(engine, titles, tmp, args.dump_batch)
            runs = {}
            for label, py in pythons.items():
                out = tmp / f"{label}.npz"
                subprocess.run([*py, "-m", "research.int8_divergence", "--worker", str(Path(engine).resolve()), str(dump),
                                str(tmp / "titles.json"), str(out)],
                               env=env, check=True, cwd=ROOT)
                with np.load(out) as z:
                    runs[label] = {k: z[k] for k in z.files}
            with Embedder(engine, threads=1) as e:
                img = e.embed(images=photos)
                precision = e.precision
            host_t, other_t = runs["host"]["vectors"], runs["other"]["vectors"]
            cos = (host_t * other_t).sum(1)
            mask = np.load(dump.with_suffix(".feed.npz"))["attention_mask"].astype(np.float32)
            report["engines"][Path(engine).name] = {
                "precision": precision,
                "graph": compare(runs["host"], runs["other"], _graph_order(dump), mask),
                "title_vector_cosine": {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)},
                "title->photo": {f"{label} titles": recall_at_k(t, img, same, same)
                                 for label, t in (("host", host_t), ("other", other_t))},
            }
            print(json.dumps(report["engines"][Path(engine).name], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
