"""Command line: `moon3 build | validate | inspect | embed | embed-catalog | reason | index | search | bench | serve`
(also `python -m sdk`).

`build` and `validate` need the toolchain (`pip install 'moon3-sdk[export]'`); `embed-catalog` needs
pyarrow, and Ray for `--runner ray` (`pip install 'moon3-sdk[ray]'`); the other commands need only
the runtime (numpy + onnxruntime), never torch; `serve` needs the web stack too
(`pip install 'moon3-sdk[serve]'`). `bench` times an engine through the runtime alone
(`sdk.bench`); the suite against the PyTorch teacher and peer libraries is `benchmarks/run.sh`.
"""

from __future__ import annotations

import argparse
import sys

from sdk import commands
from sdk.errors import SdkError


def _int_at_least(minimum: int, expected: str):
    """An argparse type: an int >= minimum, else an error saying `expected` and what was given."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return n

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_budget = _int_at_least(0, "a token budget >= 0")


def _backend_list(text: str) -> list[str]:
    """Parse "cuda,cpu" into ["cuda", "cpu"], names that `sdk.Embedder(providers=...)` accepts."""
    from sdk.sessions import BACKENDS

    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty backend name in {text!r}; separate names with commas, e.g. cuda,cpu")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend {unknown[0]!r}; available: {', '.join(BACKENDS)}")
    return names


def _providers_arg(p: argparse.ArgumentParser, **kw) -> None:
    """--providers: backend names, comma-separated (`kw` may make it repeatable, with its default and help)."""
    kw.setdefault("default", None)
    kw.setdefault("help", "backends in order of preference, comma-separated: cpu, cuda, tensorrt (default: cpu)")
    p.add_argument("--providers", type=_backend_list, metavar="NAMES", **kw)


def _runtime_args(p: argparse.ArgumentParser, threads_help: str = "ONNX Runtime intra-op threads") -> None:
    """--providers, --batch-size and --threads of the commands that embed with `sdk.Embedder`."""
    _providers_arg(p)
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                   help="items per ONNX Runtime call (default 32)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help=f"{threads_help} (default: the libraries' choice)")


def _gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-cosine-mean", type=float, default=0.995)
    p.add_argument("--min-cosine-min", type=float, default=0.97)
    p.add_argument("--max-recall-drop", type=float, default=0.01)


def _parser_build(sub) -> None:
    """`moon3 build`."""
    b = sub.add_parser("build", help="build moon3.engine from the trained reference embedder (needs [export])")
    b.add_argument("--out", default="moon3.engine")
    b.add_argument("--precision", choices=("fp32", "fp16", "int8", "int8-static", "auto"), default="int8",
                   help="int8: dynamic per-channel INT8 matmuls; int8-static: calibrated Q/DQ INT8 of the text "
                        "graph (TensorRT's explicit-quantization format) with a sensitivity-ranked FP32 fallback; "
                        "fp16: FP16 graphs with LayerNorm and softmax in FP32 (half the size; fastest on GPUs); "
                        "auto: build int8, int8-static, fp16 and fp32, keep those that pass the gates, pick the "
                        "fastest on this machine (batch-1 latency) and record why in the manifest")
    b.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="percentile")
    b.add_argument("--smooth-alpha", type=float, default=0.7,
                   help="int8: SmoothQuant with this migration strength (0-1, calibrated on catalog titles) "
                        "before quantizing the text graph, for every candidate that keeps text matmuls INT8; "
                        "-1 skips it")
    b.add_argument("--image-convs", choices=("fp32", "int8"), default="fp32",
                   help="int8 (with --precision int8): the image tower's convolutions static INT8 (calibrated on "
                        "catalog photos), the most sensitive kept FP32 after a sensitivity sweep, each candidate "
                        "gated end to end; FP32 when none passes")
    b.add_argument("--image-matmuls", choices=("int8", "fp32"), default="int8",
                   help="fp32 (with --precision int8): the image graph's matmuls (the fusion model's image encoder) "
                        "stay FP32, so photo vectors are the FP32 graph's; the text graph is quantized as usual")
    b.add_argument("--int8-activations", choices=("per-tensor", "per-token"), default="per-tensor",
                   help="int8: one activation scale per tensor (ONNX Runtime's dynamic quantization; an item's "
                        "vector moves slightly with its batch neighbours) or per token (batch-invariant: the "
                        "same vector alone or in any batch)")
    b.add_argument("--layout", choices=("split", "single"), default="split",
                   help="split: image graph + text graph + fused-op head, each tower run only for the items "
                        "that have its modality (default); single: one ONNX graph")
    b.add_argument("--weights", default=None, help="folder with embedder.safetensors (default: committed)")
    b.add_argument("--catalog", default=None, help="measure the gates on this catalog's validation split")
    b.add_argument("--samples", default=None, help="evaluation products when no --catalog (default: data/samples)")
    b.add_argument("--eval-items", type=int, default=400)
    _gate_args(b)
    b.add_argument("--reasoner", default=None, help="trained reasoner folder to add (default: the committed one, if any)")
    b.add_argument("--no-reasoner", action="store_true", help="leave the reasoner out of the engine")
    b.add_argument("--attribute-heads", default=None,
                   help="attribute heads folder the reasoner reads photos with (default: the committed one, if any)")
    b.add_argument("--no-attribute-heads", action="store_true", help="a reasoner without attribute heads")
    b.add_argument("--completion", default=None,
                   help="trained image completion folder to add (default: the committed one, if it fits the embedder)")
    b.add_argument("--no-completion", action="store_true", help="leave image completion out of the engine")
    b.add_argument("--reasoner-precision", choices=("fp32", "int8", "int4"), default="int4",
                   help="reasoner graphs: int4 weight-only MatMulNBits (default), int8 dynamic, or fp32; a quantized "
                        "reasoner is gated against the FP32 one (attribute F1, category accuracy, token agreement)")
    b.add_argument("--reasoner-block-size", type=int, default=32, help="INT4 block length (a power of 2, >= 16)")
    b.add_argument("--reasoner-lm-head-int4", action="store_true",
                   help="quantize the tied LM head too (default: FP32; it saves no bytes and costs fidelity)")
    b.add_argument("--reasoner-accuracy-level", type=int, default=4,
                   help="MatMulNBits compute: 4 = INT8 activations (default, fastest on CPU), 0 = FP32, -1 = unset")
    b.add_argument("--reasoner-eval-items", type=int, default=150, help="products the reasoner gate is measured on")
    b.add_argument("--reasoner-max-attribute-f1-drop", type=float, default=0.01)
    b.add_argument("--reasoner-max-category-acc-drop", type=float, default=0.02)
    b.add_argument("--reasoner-min-token-agreement", type=float, default=0.80)
    b.add_argument("--no-enforce", action="store_true", help="write the engine even if a gate fails")
    b.add_argument("--threads", type=int, default=0)
    b.set_defaults(func=commands.cmd_build)



def _parser_validate(sub) -> None:
    """`moon3 validate`."""
    v = sub.add_parser("validate",
                       help="measure an engine against the FP32 teacher (needs [export]); exit 3 if a gate fails")
    v.add_argument("engine")
    v.add_argument("--catalog", default=None, help="use this catalog's validation split")
    v.add_argument("--samples", default=None, help="evaluation products when no --catalog (default: data/samples)")
    v.add_argument("--eval-items", type=int, default=400)
    v.add_argument("--weights", default=None, help="teacher weights folder (default: committed)")
    v.add_argument("--report", default=None, help="write the fidelity report (JSON) here")
    _gate_args(v)
    v.add_argument("--threads", type=int, default=0)
    v.set_defaults(func=commands.cmd_validate)



def _parser_inspect(sub) -> None:
    """`moon3 inspect`."""
    i = sub.add_parser("inspect", help="print an engine's manifest: precision, dims, fidelity, parts")
    i.add_argument("engine")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.set_defaults(func=commands.cmd_inspect)



def _parser_embed(sub) -> None:
    """`moon3 embed`."""
    e = sub.add_parser("embed", help="embed catalog records (JSONL: title, image path) into a .npy file")
    e.add_argument("engine")
    e.add_argument("--input", required=True, help="items.jsonl; image paths relative to its folder or --root")
    e.add_argument("--out", required=True, help="vectors .npy (bad items: NaN rows; see <out>.items.json)")
    e.add_argument("--root", default=None)
    e.add_argument("--dim", type=int, default=None, help="Matryoshka width (default: full)")
    _runtime_args(e)
    e.set_defaults(func=commands.cmd_embed)



def _parser_reason(sub) -> None:
    """`moon3 reason`."""
    r = sub.add_parser("reason", help="let the engine's reasoner describe a product (photo and/or title)")
    r.add_argument("engine")
    r.add_argument("--image", default=None, help="product photo")
    r.add_argument("--text", default=None, help="product title")
    r.add_argument("--task", default="all", help="caption | category | attributes | attribute_qa | qa | trace | all")
    r.add_argument("--key", default=None, help="attribute for attribute_qa, e.g. colour")
    r.add_argument("--question", default=None, help="question for qa")
    r.add_argument("--max-new-tokens", type=int, default=96)
    _providers_arg(r)
    r.add_argument("--threads", type=_positive_int, default=None, metavar="N")
    r.set_defaults(func=commands.cmd_reason)



def _parser_embed_catalog(sub) -> None:
    """`moon3 embed-catalog`."""
    c = sub.add_parser(
        "embed-catalog",
        help="embed a catalog (JSONL/Parquet: id, title, image) into Parquet shards; resumable (needs [ray])",
        description="Embed a catalog into OUT/vectors/part-*.parquet (id, vector) and OUT/errors/ (bad items). "
        "A killed job restarted with the same arguments finishes the missing shards: every id comes out exactly "
        "once. Exit 1 if some items were bad (see OUT/errors.jsonl).",
    )
    c.add_argument("engine")
    c.add_argument("--input", required=True, help="catalog .jsonl or .parquet (id, title, image, trace)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--root", default=None, help="image folder (default: the catalog's folder)")
    c.add_argument("--runner", choices=("local", "ray"), default="local")
    c.add_argument("--workers", type=int, default=2, help="Ray actors (each loads the engine once)")
    c.add_argument("--cpus-per-worker", type=float, default=1)
    c.add_argument("--gpus-per-worker", type=float, default=0, help="> 0: GPU actors, CUDA backend")
    c.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    c.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    c.add_argument("--shard-size", type=int, default=1024)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--dim", type=int, default=None, help="Matryoshka width (default: full)")
    c.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per worker")
    c.add_argument("--overwrite", action="store_true", help="start over if OUT holds another job")
    c.set_defaults(func=commands.cmd_embed_catalog)



def _parser_search(sub) -> None:
    """`moon3 search`."""
    s = sub.add_parser("search", help="nearest products for text or photo queries, from an index or a catalog folder")
    s.add_argument("engine")
    s.add_argument("--index", default=None, help="vector index folder from `moon3 index build`")
    s.add_argument("--catalog", default=None, help="folder with items.jsonl (+ images): embedded and searched "
                   "exhaustively when no --index; with --index, only read to print titles")
    s.add_argument("--query", action="append", help="text query (repeatable)")
    s.add_argument("--image", action="append", help="photo query (repeatable)")
    s.add_argument("-k", "--k", type=int, default=5)
    s.add_argument("--backend", choices=("faiss", "numpy"), default=None, help="index search backend "
                   "(default: faiss when installed, else numpy)")
    _runtime_args(s)
    s.set_defaults(func=commands.cmd_search)



def _parser_index(sub) -> None:
    """`moon3 index`."""
    x = sub.add_parser("index", help="vector indexes for `moon3 search` (faiss with `pip install 'moon3-sdk[search]'`)")
    xs = x.add_subparsers(dest="index_cmd", required=True)
    xb = xs.add_parser("build", help="embed a catalog folder and write a vector index",
                       description="Embed every product of a catalog (items.jsonl: id, title, image) and write a "
                       "vector index folder. Bad items are reported and left out (exit 1 if any).")
    xb.add_argument("engine")
    xb.add_argument("--catalog", required=True, help="folder with items.jsonl (+ images)")
    xb.add_argument("--input", default=None, help="another JSONL file of products (default: CATALOG/items.jsonl)")
    xb.add_argument("--root", default=None, help="image folder (default: the catalog folder)")
    xb.add_argument("--out", required=True, help="index folder to write")
    xb.add_argument("--kind", choices=("flat", "hnsw", "ivf"), default="flat",
                    help="flat: exact (default); hnsw / ivf: approximate, for large catalogs (faiss)")
    xb.add_argument("--hnsw-m", type=int, default=32)
    xb.add_argument("--ef-search", type=int, default=64)
    xb.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about 4 sqrt(N))")
    xb.add_argument("--nprobe", type=int, default=8)
    xb.add_argument("--dim", type=int, default=None, help="Matryoshka width (default: full)")
    xb.add_argument("--limit", type=int, default=None, help="index only the first N products")
    xb.add_argument("--chunk", type=int, default=256, help="products per embedding call")
    xb.add_argument("--backend", choices=("faiss", "numpy"), default=None)
    _runtime_args(xb, threads_help="ONNX Runtime intra-op and faiss threads")
    xb.set_defaults(func=commands.cmd_index_build)



def _parser_bench(sub) -> None:
    """`moon3 bench`."""
    n = sub.add_parser("bench", help="latency p50/p99, throughput, cold start and peak RSS of an engine (runtime only)")
    n.add_argument("engine")
    n.add_argument("--modality", action="append", choices=("image+text", "text", "image"),
                   help="repeatable (default: all three)")
    n.add_argument("--batch", action="append", type=int, help="batch size, repeatable (default: 1, 8, 32)")
    n.add_argument("--rounds", type=int, default=20, help="timed calls per case (default 20)")
    n.add_argument("--warmup", type=int, default=2)
    _providers_arg(n, nargs="+", default=[["cpu"]],  # parsed as [["cuda", "cpu"]] or [["cuda"], ["cpu"]]
                   help="backends in order of preference, comma- or space-separated: cpu, cuda, tensorrt")
    n.add_argument("--threads", type=_positive_int, default=None, metavar="N")
    n.add_argument("--samples", default=None, help="folder with items.jsonl + photos (default: data/samples of a "
                   "source checkout, else synthetic inputs)")
    n.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold-start / RSS probes")
    n.add_argument("--no-reasoner", action="store_true",
                   help="skip the reasoner's prefill / decode tokens/s and the think-then-embed latency")
    n.add_argument("--budget", action="append", type=_budget, metavar="N",
                   help="think-then-embed reasoning budget, repeatable (default: 0, 16, 32, 64; 0 = reason off); "
                        "measured when the engine's embedder was trained with traces")
    n.add_argument("--json", default=None, help="write the full report (JSON) here")
    n.set_defaults(func=commands.cmd_bench)



def _parser_serve(sub) -> None:
    """`moon3 serve`."""
    sv = sub.add_parser("serve", help="HTTP embedding server with dynamic batching (needs [serve]; docs/serve.md)",
                        description="Serve an engine over HTTP: POST /v1/embeddings (OpenAI-compatible), /v1/embed "
                        "(photo + title products), /v1/reason; GET /health, /ready, /metrics. Concurrent requests "
                        "are merged into engine batches; a full queue answers 429; SIGTERM drains, then exits.")
    sv.add_argument("engine")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    sv.add_argument("--port", type=_int_at_least(0, "a port in [0, 65535]"), default=8000,
                    help="port (default 8000; 0: any free port, printed at start)")
    sv.add_argument("--max-batch", type=_positive_int, default=32, metavar="N", help="most items per engine batch")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                    help="longest wait of a queued item for its batch to fill (default 5)")
    sv.add_argument("--queue", type=_positive_int, default=1024, metavar="N",
                    help="most items waiting for the engine; more get 429 + Retry-After (default 1024)")
    sv.add_argument("--max-items", type=_positive_int, default=256, metavar="N",
                    help="most items in one request, 413 above (default 256)")
    sv.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB", help="largest request body (default 32)")
    sv.add_argument("--reason-queue", type=_positive_int, default=16, metavar="N",
                    help="most /v1/reason requests waiting or running (default 16)")
    sv.add_argument("--drain-s", type=float, default=30.0, metavar="S",
                    help="on SIGTERM, how long requests in flight may take to finish (default 30)")
    sv.add_argument("--no-reasoner", action="store_true", help="do not load the engine's reasoner (/v1/reason: 404)")
    sv.add_argument("--model-name", default=None, help="the model name responses report (default: the file's stem)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    sv.add_argument("--access-log", action="store_true", help="log one line per request")
    _providers_arg(sv)
    sv.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                    help="ONNX Runtime intra-op threads (default: physical cores - 1, at least 1; the rest serve HTTP)")
    sv.set_defaults(func=commands.cmd_serve)



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moon3", description="moon3-sdk: build, inspect and run product-embedding engines")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in (_parser_build, _parser_validate, _parser_inspect, _parser_embed, _parser_reason,
                _parser_embed_catalog, _parser_search, _parser_index, _parser_bench, _parser_serve):
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SdkError, FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
