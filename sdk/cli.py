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
import json
import sys
from pathlib import Path

from sdk.errors import SdkError


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        from sdk.export.build import BuildConfig, build_engine
        from sdk.export.gates import FidelityGates, GateError
        from sdk.train.eval_reasoner import ReasonerGates
    except ImportError as exc:
        raise SdkError(f"`build` needs the export toolchain ({exc}): pip install 'moon3-sdk[export]'") from exc
    cfg = BuildConfig(
        out=args.out,
        precision=args.precision,
        weights=args.weights,
        catalog=args.catalog,
        eval_items=args.eval_items,
        gates=FidelityGates(args.min_cosine_mean, args.min_cosine_min, args.max_recall_drop),
        enforce=not args.no_enforce,
        threads=args.threads,
        layout=args.layout,
        calib_method=args.calib_method,
        smooth_alpha=None if args.smooth_alpha < 0 else args.smooth_alpha,
        image_convs=args.image_convs,
        int8_activations=args.int8_activations,
        reasoner=None if args.no_reasoner else (args.reasoner or "auto"),
        completion=None if args.no_completion else (args.completion or "auto"),
        reasoner_precision=args.reasoner_precision,
        reasoner_block_size=args.reasoner_block_size,
        reasoner_lm_head=args.reasoner_lm_head_int4,
        reasoner_accuracy_level=None if args.reasoner_accuracy_level < 0 else args.reasoner_accuracy_level,
        reasoner_eval_items=args.reasoner_eval_items,
        reasoner_gates=ReasonerGates(args.reasoner_max_attribute_f1_drop, args.reasoner_max_category_acc_drop,
                                     args.reasoner_min_token_agreement),
        **({"samples": args.samples} if args.samples else {}),
    )
    try:
        build_engine(cfg)
    except GateError as exc:
        print(f"error: {exc}\n{json.dumps(exc.report, indent=2)}", file=sys.stderr)
        return 3
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        from sdk.export.gates import FidelityGates, validate_engine
    except ImportError as exc:
        raise SdkError(f"`validate` needs the export toolchain ({exc}): pip install 'moon3-sdk[export]'") from exc
    report = validate_engine(
        args.engine,
        catalog=args.catalog,
        eval_items=args.eval_items,
        gates=FidelityGates(args.min_cosine_mean, args.min_cosine_min, args.max_recall_drop),
        weights=args.weights,
        threads=args.threads,
        **({"samples": args.samples} if args.samples else {}),
    )
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    print(f"{args.engine}: fidelity gates {'passed' if report['passed'] else 'FAILED: ' + '; '.join(report['failed'])}")
    return 0 if report["passed"] else 3


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sdk.engine import EngineFile

    e = EngineFile.read(args.engine)
    m = e.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    emb = m.get("embedder", {})
    fid = m.get("fidelity", {})
    print(f"{e.path}: moon3 engine format {m.get('format_version')}, created {m.get('created')}")
    print(f"  embedder: {emb.get('precision')}  dim {emb.get('dim')}  matryoshka {emb.get('matryoshka_dims')}")
    if emb.get("layout") == "split":
        print(f"  layout:   split: {', '.join(f'{k} {v}' for k, v in emb.get('parts', {}).items())} -> {emb.get('output')}")
    else:
        print(f"  inputs:   {', '.join(emb.get('inputs', {}))} -> {emb.get('output')}")
    rs = m.get("reasoner")
    if isinstance(rs, dict):
        met = rs.get("metrics", {})
        print(f"  reasoner: {', '.join(rs.get('tasks', {}))}; greedy, max {rs.get('max_len')} tokens"
              + (f"; validation caption token-F1 {met['caption_token_f1']:.3f}" if "caption_token_f1" in met else ""))
        q = rs.get("quantization") or {}
        print(f"    precision {q.get('label') or rs.get('precision', 'fp32')}"
              + (f"; vs FP32: {'passed' if q['fidelity']['passed'] else 'FAILED'} (attribute F1 drop "
                 f"{max(q['fidelity']['drop']['attribute_f1_photo'], q['fidelity']['drop']['attribute_f1_title']):+.4f}, "
                 f"token agreement {q['fidelity']['agreement']['tokens']:.4f})" if "fidelity" in q else ""))
    auto = (m.get("build") or {}).get("auto")
    if isinstance(auto, dict):
        print(f"  precision chosen by --precision auto: {auto.get('why')}")
    cs = m.get("completion")
    if isinstance(cs, dict):
        print(f"  completion: missing {cs.get('completes')} from the title ({cs.get('part')}); "
              f"parity min cosine {cs.get('parity', {}).get('min_cosine')}")
    pre = m.get("preprocess", {})
    print(f"  image:    {pre.get('image')}")
    print(f"  text:     max {pre.get('text', {}).get('max_length')} tokens; "
          f"trace max {pre.get('trace', {}).get('max_length')}")
    if fid:
        print(f"  fidelity vs FP32 teacher ({fid.get('items')} products, {fid.get('eval_source')}): "
              f"{'passed' if fid.get('passed') else 'FAILED ' + '; '.join(fid.get('failed', []))}")
        for view, v in fid.get("views", {}).items():
            print(f"    {view:12s} cosine mean {v['cosine_mean']:.5f}  min {v['cosine_min']:.5f}")
        r = fid.get("text->image R@10", {})
        if r:
            print(f"    text->image R@10 teacher {r['teacher']:.4f}  engine {r['engine']:.4f}  drop {r['drop']:+.4f}")
    print(f"  versions: {m.get('versions')}")
    for p in m.get("parts", []):
        print(f"  part {p['name']:16s} {p['size'] / 2**20:8.2f} MiB  sha256 {p['sha256'][:16]}…")
    return 0


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path} (expected a JSONL file, one product per line)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SdkError(f"{path}:{n}: not valid JSON ({exc})") from exc
    return out


def _renumber(msg: str, index: int) -> str:
    """An embedder message about record i of a chunk ("record 3 image: ...") about the file's record."""
    import re

    return re.sub(r"^record \d+", f"record {index}", msg, count=1)


def _embed_records(emb, records: list[dict], root: Path, dim: int | None, chunk: int = 256, batch_size: int = 32):
    """Vectors for records (NaN rows for bad ones) and {index: message}, with a progress bar on stderr."""
    import time

    import numpy as np

    from sdk.errors import BatchError

    vecs, errors = [], {}
    t0 = time.time()
    for s in range(0, len(records), chunk):
        part = records[s : s + chunk]
        try:
            v = emb.embed_products(part, root=root, dim=dim, batch_size=batch_size)
        except BatchError as exc:
            v = exc.vectors
            errors.update({s + i: _renumber(msg, s + i) for i, msg in exc.errors.items()})
        vecs.append(v)
        _progress(min(s + chunk, len(records)), len(records), t0)
    print(file=sys.stderr)
    return np.concatenate(vecs) if vecs else np.zeros((0, dim or emb.dim), np.float32), errors


def _cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from sdk.embedder import Embedder

    src = Path(args.input)
    records = _read_jsonl(src)
    emb = Embedder(args.engine, providers=args.providers, threads=args.threads)
    vecs, errors = _embed_records(emb, records, Path(args.root) if args.root else src.parent, args.dim,
                                  batch_size=args.batch_size)
    out = Path(args.out)
    np.save(out, vecs)
    ids = [r.get("id") if isinstance(r, dict) else None for r in records]
    side = out.with_suffix(".items.json")
    side.write_text(json.dumps({"ids": ids, "errors": {str(k): v for k, v in sorted(errors.items())}}, indent=1))
    print(f"wrote {out} {vecs.shape} ({emb.precision}, backend {emb.backend}) and {side}")
    for i, msg in sorted(errors.items()):
        print(f"  bad item: {msg}", file=sys.stderr)
    return 1 if errors else 0


def _cmd_reason(args: argparse.Namespace) -> int:
    from sdk.reasoner import Reasoner

    r = Reasoner(args.engine, threads=args.threads, providers=args.providers)
    fields = {k: v for k, v in (("key", args.key), ("question", args.question)) if v}
    tasks = list(r.tasks) if args.task == "all" else [args.task]
    for task in tasks:
        needs = {"attribute_qa": "key", "qa": "question"}.get(task)
        if args.task == "all" and needs and needs not in fields:
            continue
        text = r.generate(image=args.image, text=args.text, task=task, max_new_tokens=args.max_new_tokens, **fields)
        st = r.last_stats
        print(f"{task:13s} {text}")
        print(f"{'':13s} ({st['new_tokens']} tokens; prefill {st['prefill_tokens_per_s']:.0f} tok/s, "
              f"decode {st['decode_tokens_per_s']:.0f} tok/s)", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from sdk.serve import main_args

    return main_args(args)


def _cmd_embed_catalog(args: argparse.Namespace) -> int:
    from sdk.batch import CatalogJob, run_local

    job = CatalogJob(input=args.input, out=args.out, engine=args.engine, root=args.root,
                     shard_size=args.shard_size, dim=args.dim, batch_size=args.batch_size)

    def progress(c: dict[str, int]) -> None:
        print(f"shard {c['index']}: {c['embedded']} embedded, {c['bad']} bad", file=sys.stderr, flush=True)

    if args.runner == "ray":
        from sdk.ray import run_ray

        init = {"num_cpus": args.ray_cpus} if args.ray_cpus else {}
        summary = run_ray(job, workers=args.workers, num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker,
                          threads=args.threads, overwrite=args.overwrite, address=args.address, init_kwargs=init,
                          on_shard=progress)
    else:
        summary = run_local(job, threads=args.threads, overwrite=args.overwrite, on_shard=progress)
    print(json.dumps(summary.to_dict()))
    return 1 if summary.bad else 0


def _progress(done: int, total: int, t0: float, what: str = "products") -> None:
    import time

    width = 30
    frac = done / total if total else 1.0
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0.0
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    print(f"\r[{bar}] {done}/{total} {what}  {rate:.1f}/s  eta {eta:.0f} s ", end="", file=sys.stderr, flush=True)


def _cmd_index_build(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from sdk.embedder import Embedder
    from sdk.errors import BatchError
    from sdk.index import IndexConfig, VectorIndex

    config = {"flat": IndexConfig.flat, "hnsw": lambda: IndexConfig.hnsw(args.hnsw_m, args.ef_search),
              "ivf": lambda: IndexConfig.ivf(args.nlist, args.nprobe)}[args.kind]()
    root = Path(args.catalog)
    src = Path(args.input) if args.input else root / "items.jsonl"
    records = _read_jsonl(src)
    if args.limit:
        records = records[: args.limit]
    emb = Embedder(args.engine, providers=args.providers, threads=args.threads)
    bad: dict[int, str] = {}
    ids: list = []
    seen: set = set()
    for i, r in enumerate(records):
        rid = r.get("id", i) if isinstance(r, dict) else i  # no id: the line number
        if isinstance(rid, bool) or not isinstance(rid, (int, str)):
            bad[i] = f"record {i}: id {rid!r} is not an int or str"
        elif rid in seen:
            bad[i] = f"record {i}: id {rid!r} repeats an earlier record's"
        seen.add(rid)
        ids.append(rid)
    vecs = np.full((len(records), args.dim or emb.dim), np.nan, np.float32)
    t0 = time.time()
    for s in range(0, len(records), args.chunk):
        part = records[s : s + args.chunk]
        try:
            vecs[s : s + len(part)] = emb.embed_products(part, root=args.root or root, dim=args.dim,
                                                         batch_size=args.batch_size)
        except BatchError as exc:
            vecs[s : s + len(part)] = exc.vectors
            bad.update({s + i: _renumber(msg, s + i) for i, msg in exc.errors.items() if s + i not in bad})
        _progress(min(s + args.chunk, len(records)), len(records), t0)
    print(file=sys.stderr)
    t_embed = time.time() - t0
    keep = [i for i in range(len(records)) if i not in bad and np.isfinite(vecs[i]).all()]
    for i, msg in sorted(bad.items()):
        print(f"  bad item: {msg}", file=sys.stderr)
    t0 = time.time()
    index = VectorIndex.build(vecs[keep], [ids[i] for i in keep], config, embedder=emb, backend=args.backend,
                              threads=args.threads)
    t_build = time.time() - t0
    index.save(args.out)
    print(f"wrote {args.out}: {len(index)} of {len(records)} products, {index.dim}-d, {index.kind} index on "
          f"{index.backend} ({emb.precision}, backend {emb.backend}); embedded in {t_embed:.1f} s, "
          f"indexed in {t_build:.2f} s; {len(bad)} bad item(s)")
    return 1 if bad else 0


def _cmd_search(args: argparse.Namespace) -> int:
    if args.index:
        return _search_index(args)
    if not args.catalog:
        raise SdkError("search needs --index INDEX (from `moon3 index build`) or --catalog DIR")
    import time

    import numpy as np

    from sdk.embedder import Embedder

    root = Path(args.catalog)
    records = _read_jsonl(root / "items.jsonl")
    t0 = time.time()
    emb = Embedder(args.engine, providers=args.providers, threads=args.threads)
    t_load = time.time() - t0
    t0 = time.time()
    index, errors = _embed_records(emb, records, root, None, batch_size=args.batch_size)
    ok = ~np.isnan(index).any(1)
    print(
        f"{emb.path.name} ({emb.precision}, backend {emb.backend}, loaded in {t_load:.1f} s): "
        f"embedded {int(ok.sum())} of {len(records)} products in {time.time() - t0:.1f} s"
    )

    def show(title: str, q) -> None:
        sims = np.where(ok, index @ q, -np.inf)
        print(title)
        for rank, i in enumerate(np.argsort(-sims)[: args.k], 1):
            r = records[i]
            print(f"  {rank}. {sims[i]:.3f}  {r.get('title')}  [{r.get('article_type', '')}, {r.get('base_colour', '')}]")

    queries = args.query or []
    if queries:
        for text, q in zip(queries, emb.embed(texts=queries, batch_size=args.batch_size)):
            show(f'text query "{text}":', q)
    for path in args.image or []:
        show(f"photo query {path}:", emb.embed(images=[path], batch_size=args.batch_size)[0])
    return 0


def _search_index(args: argparse.Namespace) -> int:
    import time

    from sdk.embedder import Embedder
    from sdk.index import VectorIndex

    t0 = time.time()
    emb = Embedder(args.engine, providers=args.providers, threads=args.threads)
    t_engine = time.time() - t0
    t0 = time.time()
    index = VectorIndex.load(args.index, embedder=emb, backend=args.backend)
    t_index = time.time() - t0
    titles = {}
    if args.catalog:  # only to print titles next to the ids
        for r in _read_jsonl(Path(args.catalog) / "items.jsonl"):
            if isinstance(r, dict) and "id" in r:
                titles[r["id"]] = f"{r.get('title')}  [{r.get('article_type', '')}, {r.get('base_colour', '')}]"
    print(f"{Path(args.index).name}: {len(index)} products, {index.dim}-d {index.kind} index on {index.backend} "
          f"(loaded in {t_index:.2f} s); engine {emb.path.name} ({emb.precision}, loaded in {t_engine:.1f} s)")
    dim = index.dim if index.dim != emb.dim else None
    queries = [(f'text query "{q}"', {"texts": [q]}) for q in args.query or []]
    queries += [(f"photo query {p}", {"images": [p]}) for p in args.image or []]
    if not queries:
        raise SdkError("give at least one --query TEXT or --image PATH")
    for title, call in queries:
        t0 = time.perf_counter()
        q = emb.embed(**call, dim=dim, batch_size=args.batch_size)
        t1 = time.perf_counter()
        scores, ids = index.search(q, args.k)
        t2 = time.perf_counter()
        print(f"{title}: (embed {1e3 * (t1 - t0):.1f} ms, search {1e3 * (t2 - t1):.2f} ms)")
        for rank, (score, i) in enumerate(zip(scores[0], ids[0]), 1):
            print(f"  {rank}. {score:.3f}  {i}" + (f"  {titles[i]}" if i in titles else ""))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from sdk.bench import TTE_BUDGETS, run_bench
    from sdk.paths import SAMPLES

    samples = args.samples if args.samples else (SAMPLES if (SAMPLES / "items.jsonl").is_file() else None)
    report = run_bench(
        args.engine,
        modalities=args.modality or ("image+text", "text", "image"),
        batches=args.batch or (1, 8, 32),
        rounds=args.rounds,
        warmup=args.warmup,
        providers=[name for names in args.providers for name in names],
        threads=args.threads,
        samples=samples,
        cold_start=not args.no_cold_start,
        reasoner=not args.no_reasoner,
        think_then_embed=not args.no_reasoner,
        budgets=args.budget or TTE_BUDGETS,
        log=lambda line: print(line, flush=True),
    )
    print(f"{report['engine']}: {report['precision']} on {report['backend']}, inputs {report['inputs']}, "
          f"{report['rounds']} rounds after {report['warmup']} warm-up calls")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


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
    b.set_defaults(func=_cmd_build)



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
    v.set_defaults(func=_cmd_validate)



def _parser_inspect(sub) -> None:
    """`moon3 inspect`."""
    i = sub.add_parser("inspect", help="print an engine's manifest: precision, dims, fidelity, parts")
    i.add_argument("engine")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.set_defaults(func=_cmd_inspect)



def _parser_embed(sub) -> None:
    """`moon3 embed`."""
    e = sub.add_parser("embed", help="embed catalog records (JSONL: title, image path) into a .npy file")
    e.add_argument("engine")
    e.add_argument("--input", required=True, help="items.jsonl; image paths relative to its folder or --root")
    e.add_argument("--out", required=True, help="vectors .npy (bad items: NaN rows; see <out>.items.json)")
    e.add_argument("--root", default=None)
    e.add_argument("--dim", type=int, default=None, help="Matryoshka width (default: full)")
    _runtime_args(e)
    e.set_defaults(func=_cmd_embed)



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
    r.set_defaults(func=_cmd_reason)



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
    c.set_defaults(func=_cmd_embed_catalog)



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
    s.set_defaults(func=_cmd_search)



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
    xb.set_defaults(func=_cmd_index_build)



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
    n.set_defaults(func=_cmd_bench)



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
    sv.set_defaults(func=_cmd_serve)



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
