"""The commands of `moon3` (`sdk.cli` parses the arguments): each `cmd_<name>(args)` runs one
subcommand and returns its exit code. Imports what a command needs when it runs, so `moon3 inspect`
never loads the toolchain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdk.errors import SdkError


def cmd_build(args: argparse.Namespace) -> int:
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
        image_matmuls=args.image_matmuls,
        int8_activations=args.int8_activations,
        reasoner=None if args.no_reasoner else (args.reasoner or "auto"),
        completion=None if args.no_completion else (args.completion or "auto"),
        attribute_heads=None if args.no_attribute_heads else (args.attribute_heads or "auto"),
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


def cmd_validate(args: argparse.Namespace) -> int:
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


def cmd_inspect(args: argparse.Namespace) -> int:
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
        hd = rs.get("heads")
        if isinstance(hd, dict):
            v = hd.get("validation") or {}
            print(f"    attribute heads: {len(hd.get('fields', []))} fields read from the photo (FP32)"
                  + (f"; validation attribute F1 {v['attribute_f1']:.3f}, article type {v['category_acc']:.3f}"
                     if "attribute_f1" in v else ""))
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


def embed_records(emb, records: list[dict], root: Path, dim: int | None, chunk: int = 256, batch_size: int = 32):
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


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from sdk.embedder import Embedder

    src = Path(args.input)
    records = _read_jsonl(src)
    emb = Embedder(args.engine, providers=args.providers, threads=args.threads)
    vecs, errors = embed_records(emb, records, Path(args.root) if args.root else src.parent, args.dim,
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


def cmd_reason(args: argparse.Namespace) -> int:
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
        if st.get("heads"):
            print(f"{'':13s} (read from the photo by the attribute heads in {st['seconds'] * 1e3:.0f} ms)", file=sys.stderr)
        else:
            print(f"{'':13s} ({st['new_tokens']} tokens; prefill {st['prefill_tokens_per_s']:.0f} tok/s, "
                  f"decode {st['decode_tokens_per_s']:.0f} tok/s)", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sdk.serve import main_args

    return main_args(args)


def cmd_embed_catalog(args: argparse.Namespace) -> int:
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


def cmd_index_build(args: argparse.Namespace) -> int:
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


def cmd_search(args: argparse.Namespace) -> int:
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
    index, errors = embed_records(emb, records, root, None, batch_size=args.batch_size)
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


def cmd_bench(args: argparse.Namespace) -> int:
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
