"""What storing the shipped weights in FP16 costs: each FP16-stored model against its FP32 original.

    python -m sdk.export.fp16_fidelity --fp32-rev 433e360 --embedder sdk/train/weights \\
        --reasoner sdk/train/weights/reasoner --completion sdk/train/weights/completion \\
        --out docs/results/weights_fp16.json

The FP32 originals are read from git (`git show REV:PATH`, the commit before the conversion)
into a temporary folder, or from the folder given as `--embedder FP16_DIR=FP32_DIR`; the FP16
copies are the folders given (written by `python -m sdk.train.fusion_model SRC DST` and
`python -m sdk.train.reasoner_model SRC DST`). Both load into FP32 models (`sdk.train.storage`), so the
difference is the weights' rounding alone. On the sample products (data/samples; or the
validation split of `--catalog`):

- embedder: the build's fidelity report (`sdk.export.gates.fidelity_report`, the engine gates'
  defaults) of the FP16-stored teacher against the FP32 one: cosine mean / min and the largest L2
  distance between the unit vectors per view (photo+title, photo, title, photo+title+trace),
  text->image R@10 drop; image->text R@10 of both;
- completion (image completion, trained against the FP32 embedder): the completed title-only
  vectors under each embedder, their cosine, and how close each sits to its product's real
  photo+title vector;
- reasoner: FP32 reasoner engines of both weights (exported, greedy parity checked), measured
  through `sdk.Reasoner` exactly as the build gates a quantized reasoner
  (`sdk.train.eval_reasoner`): identical generations, token agreement, metric drops, the gates.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..paths import PACKAGE, REPO, SAMPLES


def fp32_from_git(rev: str, folder: Path, names: Sequence[str], dst: Path) -> Path:
    """Copy `folder/<name>` of each name as of commit `rev` into `dst` (`git show`, no checkout).

    A folder inside the package is looked up where `rev` kept it: at its path in the repository,
    or, in commits from before `sdk.train`, `sdk.export` and `sdk.calib` moved under `sdk/`, at its
    path within the package (`train/weights` for `sdk/train/weights`)."""
    folder = folder.resolve()
    places = [folder.relative_to(REPO)]
    if folder.is_relative_to(PACKAGE):
        places.append(folder.relative_to(PACKAGE))
    rel = next((p for p in places if _in_commit(rev, p)), places[0])
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        blob = subprocess.run(["git", "show", f"{rev}:{(rel / name).as_posix()}"], cwd=REPO, check=True,
                              capture_output=True).stdout
        (dst / name).write_bytes(blob)
    return dst


def _in_commit(rev: str, path: Path) -> bool:
    """Whether commit `rev` has `path` (a folder or file of the repository)."""
    return subprocess.run(["git", "cat-file", "-e", f"{rev}:{path.as_posix()}"], cwd=REPO,
                          capture_output=True).returncode == 0


def _pair(spec: str, rev: str | None, names: Sequence[str], tmp: Path) -> tuple[Path, Path, str]:
    """(FP16 folder, FP32 folder, where the FP32 one came from) of a `FOLDER[=FP32_DIR]` argument."""
    folder, _, fp32 = spec.partition("=")
    if fp32:
        return Path(folder), Path(fp32), fp32
    if rev is None:
        raise SystemExit(f"{folder}: give its FP32 original as {folder}=FP32_DIR, or --fp32-rev")
    return Path(folder), fp32_from_git(rev, Path(folder), names, tmp), f"{rev}:{Path(folder).as_posix()}"


def _file(path: Path) -> dict:
    from safetensors import safe_open

    from sdk.paths import file_sha256
    from sdk.train.storage import load_fp32_state

    with safe_open(str(path), "pt") as f:
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    n = sum(v.numel() for v in load_fp32_state(path).values())
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path), "stored": dtypes, "parameters": n}


def measure_embedder(fp32_dir: Path, fp16_dir: Path, products, completion_dir: Path | None = None, log=print) -> dict:
    """The FP16-stored embedder against the FP32 one on `products` [(photo, title)] (and, with
    `completion_dir`, the completed title-only vectors under each)."""
    from sdk.export.gates import FidelityGates, embed_views, fidelity_report, recall_at_10
    from sdk.train.reference import ReferenceEmbedder

    titles = [t for _, t in products]
    views, completed = {}, {}
    for name, folder in (("fp32", fp32_dir), ("fp16", fp16_dir)):
        log(f"embedder {name}: {folder} on {len(products)} products")
        ref = ReferenceEmbedder(folder)
        views[name] = embed_views(ref.embed, products)
        if completion_dir is not None:
            completed[name] = _completed(ref, completion_dir, titles)
        del ref
    rep = fidelity_report(views["fp32"], views["fp16"], titles, FidelityGates())
    for view, v in rep["views"].items():
        # the cosine rounds to 1.0 (and 1 - cosine sits at float32's resolution): the L2 distance of the
        # unit vectors, sqrt(2 (1 - cosine)), resolves the difference
        v["max_l2_distance"] = float(np.linalg.norm(views["fp32"][view] - views["fp16"][view], axis=1).max())
    rep["image->text R@10"] = {k: round(recall_at_10(v["photo"], v["title"], titles), 4) for k, v in views.items()}
    rep["image->text R@10"]["drop"] = round(rep["image->text R@10"]["fp32"] - rep["image->text R@10"]["fp16"], 4)
    # fidelity_report names its two sides after the engine gate: here "teacher" is FP32, "engine" FP16
    rep["text->image R@10"] = {"fp32": rep["text->image R@10"]["teacher"], "fp16": rep["text->image R@10"]["engine"],
                               "drop": rep["text->image R@10"]["drop"]}
    out = {"kind": "embedder", "fidelity": rep}
    if completion_dir is not None:
        real = views["fp32"]["photo+title"], views["fp16"]["photo+title"]
        alone = views["fp32"]["title"], views["fp16"]["title"]
        cos = np.sum(completed["fp32"] * completed["fp16"], axis=1)
        out["completion"] = {
            "path": str(completion_dir), "items": len(titles),
            "completed fp16 vs fp32 cosine": {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6),
                                              "max_l2_distance": float(np.linalg.norm(completed["fp32"] - completed["fp16"],
                                                                                      axis=1).max())},
            "cos(completed, real photo+title) mean": {
                k: round(float(np.sum(completed[k] * r, axis=1).mean()), 4) for k, r in zip(("fp32", "fp16"), real)},
            "cos(title alone, real photo+title) mean": {
                k: round(float(np.sum(a * r, axis=1).mean()), 4) for k, a, r in zip(("fp32", "fp16"), alone, real)},
        }
    return out


def _completed(ref, completion_dir: Path, titles: list[str], bs: int = 32) -> np.ndarray:
    """Title-only vectors with the photo completed from the title (PyTorch, as the engine's completion part)."""
    import torch

    from sdk.train.completion import fuse_completed, load_completion

    completion, _ = load_completion(completion_dir)
    out = []
    with torch.no_grad():
        for s in range(0, len(titles), bs):
            states, mask = ref._text_states(titles[s : s + bs], ref.tokenizer)  # (B, T, C), (B, T)
            out.append(fuse_completed(ref.model, completion, states, mask).numpy())
    return np.concatenate(out)


def measure_reasoner(fp32_dir: Path, fp16_dir: Path, records: list[dict], work: Path, threads: int = 1, log=print) -> dict:
    """FP32 reasoner engines of both weights, the FP16-stored one gated against the FP32 one as the build
    gates a quantized reasoner."""
    from sdk.export.reasoner_build import build_reasoner_engines
    from sdk.train.eval_reasoner import ReasonerGates, agreement, evaluate_engine, format_metrics, gate

    measured = {}
    for name, folder in (("fp32", fp32_dir), ("fp16", fp16_dir)):
        engine = build_reasoner_engines(folder, work / name, precisions=("fp32",), log=log)["fp32"]
        m, gens = evaluate_engine(engine, records, threads=threads, trace_items=min(100, len(records)))
        log(f"reasoner {name}: {format_metrics(m)} [{m['seconds']} s]")
        measured[name] = (m, gens)
    (ref, ref_out), (cand, cand_out) = measured["fp32"], measured["fp16"]
    verdict = gate(ref, cand, agreement(cand_out, ref_out), ReasonerGates(), n_items=len(records))
    verdict["fp32"], verdict["fp16"] = verdict.pop("reference"), verdict.pop("candidate")
    return {"kind": "reasoner", "fidelity": verdict}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdk.export.fp16_fidelity", description=__doc__.splitlines()[0])
    ap.add_argument("--fp32-rev", default=None,
                    help="git commit holding the FP32 originals of the folders (for those given without =FP32_DIR)")
    ap.add_argument("--embedder", action="append", default=[],
                    help="FP16-stored embedder folder, or FOLDER=FP32_DIR (its FP32 original there); repeatable")
    ap.add_argument("--reasoner", action="append", default=[],
                    help="FP16-stored reasoner folder, or FOLDER=FP32_DIR; repeatable")
    ap.add_argument("--completion", type=Path, default=None,
                    help="image completion folder, measured under the first embedder's FP32 and FP16 weights")
    ap.add_argument("--catalog", type=Path, default=None, help="measure on this catalog's validation split")
    ap.add_argument("--samples", type=Path, default=SAMPLES, help="else on these sample products")
    ap.add_argument("--eval-items", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="JSON report")
    a = ap.parse_args(argv)
    import onnxruntime
    import torch

    from sdk.export.gates import eval_products
    from sdk.train.eval_reasoner import eval_records
    from sdk.version import __version__

    torch.set_num_threads(max(a.threads, 1))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    source = Path(a.catalog or a.samples).resolve()
    source = source.relative_to(REPO) if source.is_relative_to(REPO) else a.catalog or a.samples
    products = eval_products(a.catalog, a.samples, a.eval_items)
    t0 = time.time()
    report: dict = {
        "command": "python -m sdk.export.fp16_fidelity " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "fp32_rev": a.fp32_rev, "source": str(source), "products": len(products),
        "versions": {"sdk": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="moon3-fp16-") as tmp:
        tmp = Path(tmp)
        for k, spec in enumerate(a.embedder):
            folder, fp32, where = _pair(spec, a.fp32_rev, ("embedder.safetensors", "embedder.json"), tmp / f"embedder{k}")
            rep = measure_embedder(fp32, folder, products, a.completion if k == 0 else None, log=log)
            rep["fp32"] = {"path": where, **_file(fp32 / "embedder.safetensors")}
            rep["fp16"] = {"path": folder.as_posix(), **_file(folder / "embedder.safetensors")}
            report["models"][folder.as_posix()] = rep
        for k, spec in enumerate(a.reasoner):
            names = ("reasoner.safetensors", "reasoner.json", "reasoner_tokenizer.json")
            folder, fp32, where = _pair(spec, a.fp32_rev, names, tmp / f"reasoner{k}")
            records = eval_records(a.catalog, None if a.catalog else a.samples, a.eval_items)
            rep = measure_reasoner(fp32, folder, records, tmp / f"engines{k}", threads=a.threads, log=log)
            rep["fp32"] = {"path": where, **_file(fp32 / "reasoner.safetensors")}
            rep["fp16"] = {"path": folder.as_posix(), **_file(folder / "reasoner.safetensors")}
            report["models"][folder.as_posix()] = rep
    report["seconds"] = round(time.time() - t0, 1)
    report["passed"] = all(m["fidelity"]["passed"] for m in report["models"].values())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, m in report["models"].items():
        f = m["fidelity"]
        if m["kind"] == "embedder":
            worst = max(v["max_l2_distance"] for v in f["views"].values())
            drops = f"{f['text->image R@10']['drop']:+.4f} / {f['image->text R@10']['drop']:+.4f}"
            log(f"{name}: unit vectors at most {worst:.2e} apart, R@10 drop text->image / image->text {drops} "
                f"-> {'passed' if f['passed'] else 'FAILED'}")
        else:
            log(f"{name}: {f['agreement']['exact']:.4f} identical generations, {f['agreement']['tokens']:.4f} tokens "
                f"agree -> {'passed' if f['passed'] else 'FAILED'}")
    print(f"wrote {a.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
