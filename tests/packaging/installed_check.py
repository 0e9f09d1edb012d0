"""What `scripts/build_wheels.sh` checks inside the interpreter a wheel was installed into (a fresh
x86-64 venv, or aarch64 Python under qemu-user), outside the source tree and without torch.

    python -I installed_check.py --out DIR [--engine E ... --samples DIR [--limit N]]
                                 [--readme README.md [--readme-engine E]]

Writes DIR/check.json and, for each --engine E, DIR/vectors-<E's stem>.npy (the sample products
embedded in items.jsonl order). Sections of check.json:
  * import: machine, where `sdk` was imported from, `sdk._C` loaded and which kernel it dispatches
    to, versions, and that torch was not imported;
  * ops: each fused op of `sdk._C` against its NumPy reference (max abs error, the op's named
    tolerance, passed), at the real head's widths;
  * embed: per engine, the sample products embedded with it (count, precision, seconds);
  * cli: `python -m sdk inspect ENGINE` in a child process (the `moon3` command), first engine;
  * readme: the README's "Using an engine" Python example run as written against the engine, in a
    scratch folder holding the engine under each *.engine name and the input files it names.
Only the runtime's dependencies are imported (numpy, onnxruntime, pillow, tokenizers).
"""

import argparse
import ast
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

INPUT_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".jsonl", ".json", ".parquet"}


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def check_import() -> dict:
    from importlib.metadata import PackageNotFoundError, distribution

    import onnxruntime

    import sdk
    import sdk.ops

    def wheel_tags(name: str) -> list[str] | None:
        """The platform tags of an installed distribution's wheel (what it asks of glibc)."""
        try:
            text = distribution(name).read_text("WHEEL") or ""
        except PackageNotFoundError:
            return None
        return sorted({line.split(":", 1)[1].strip().split("-")[-1] for line in text.splitlines()
                       if line.startswith("Tag:")})

    c = sdk.ops._C
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "sdk_file": sdk.__file__,
        "sdk_version": sdk.__version__,
        "have_c": sdk.ops.HAVE_C,
        "c_file": getattr(c, "__file__", None),
        "c_version": getattr(c, "__version__", None),
        "l2_kernel": c.l2_normalize_kernel() if c is not None else None,
        "fused_kernel": c.fused_kernel() if c is not None else None,
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_imported": "torch" in sys.modules,
        "wheel_tags": {name: wheel_tags(name) for name in ("moon3-sdk", "numpy", "onnxruntime", "pillow", "tokenizers")},
    }


def _compare(name: str, got, want, atol: float) -> dict:
    got, want = (x if isinstance(x, tuple) else (x,) for x in (got, want))
    err = max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))) for g, w in zip(got, want))
    return {"op": name, "max_abs_err": err, "atol": atol, "passed": err <= atol}


def check_ops() -> list[dict]:
    """The compiled ops (what `sdk.ops.HAVE_C` dispatches to) against their references (HAVE_C off)."""
    from sdk import fused, ops
    from sdk.head import FusionHead, head_weight_shapes

    if not ops.HAVE_C:
        return [{"op": "sdk._C", "passed": False, "error": "sdk._C did not load"}]
    rng = np.random.default_rng(0)
    B, d, M, Cs, H = 17, 256, 3, 152, 128  # the shipped head's widths, a batch that is not a multiple of 8

    x = _rand(rng, B, 2 * d + 3)
    present = (rng.uniform(size=(B, M)) > 0.4).astype(np.float32)
    present[:, 0] = 1.0
    epi = (_rand(rng, B, d), _rand(rng, B, M, d), _rand(rng, B, M), present, _rand(rng, d, d, scale=1 / math.sqrt(d)),
           _rand(rng, d), 1 + _rand(rng, d, scale=0.1), _rand(rng, d, scale=0.1))
    fire = fused.FireParams(
        1 + _rand(rng, d, scale=0.1), _rand(rng, d, scale=0.1), _rand(rng, H, d, scale=1 / math.sqrt(d)), _rand(rng, H),
        _rand(rng, H, scale=1 / math.sqrt(H)), 0.3, 1 + _rand(rng, Cs, scale=0.1), _rand(rng, Cs, scale=0.1),
        _rand(rng, H, Cs, scale=1 / math.sqrt(Cs)), _rand(rng, H), _rand(rng, d, H, scale=1 / math.sqrt(H)), _rand(rng, d),
        0.7,
    )
    h, shallow = _rand(rng, 49, d), _rand(rng, 49, Cs)  # (rows, d), (rows, Cs): 49 image tokens
    D = 2 * d + 3
    proj = (_rand(rng, B, d), 1 + _rand(rng, d, scale=0.1), _rand(rng, d, scale=0.1),
            _rand(rng, D, d, scale=1 / math.sqrt(d)), _rand(rng, D))

    cfg = {"d_model": d, "n_heads": 4, "text_dim": 384, "ffn_mult": 4, "out_dim": 256, "n_fusion_layers": 2,
           "n_image_tokens": 9}
    state = {}
    for name, shape in head_weight_shapes(cfg).items():
        if name.endswith(".weight") and len(shape) == 1:
            state[name] = 1 + _rand(rng, *shape, scale=0.1)  # LayerNorm gains
        else:
            state[name] = _rand(rng, *shape, scale=1 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.1)
    head = FusionHead(state, cfg)
    T, S = 7, 5
    hp = (rng.uniform(size=(B, 3)) > 0.35).astype(np.float32)
    tmask = (np.arange(T)[None] < rng.integers(1, T + 1, (B, 1))).astype(np.float32) * hp[:, 1:2]
    smask = (np.arange(S)[None] < rng.integers(1, S + 1, (B, 1))).astype(np.float32) * hp[:, 2:3]
    head_args = (_rand(rng, B, 9, d) * hp[:, :1, None], _rand(rng, B, T, 384), tmask, _rand(rng, B, S, 384), smask, hp)

    got = {
        "l2_normalize": ops.l2_normalize(x, 64),
        "fusion_epilogue": fused.fusion_epilogue(*epi),
        "fire_residual": fused.fire_residual(h, shallow, fire),
        "project_normalize": fused.project_normalize(*proj, 128),
        "fusion_head": head(*head_args) if head.fused else None,
    }
    ops.HAVE_C = False  # the references: NumPy only, no compiled kernel anywhere below
    try:
        want = {
            "l2_normalize": ops.l2_normalize_ref(x, 64),
            "fusion_epilogue": fused.fusion_epilogue_ref(*epi),
            "fire_residual": fused.fire_residual_ref(h, shallow, fire),
            "project_normalize": fused.project_normalize_ref(*proj, 128),
            "fusion_head": head.forward_reference(*head_args),
        }
    finally:
        ops.HAVE_C = True
    atol = {"l2_normalize": ops.L2_NORMALIZE_ATOL}
    out = []
    for name in got:
        if got[name] is None:
            out.append({"op": name, "passed": False, "error": "the compiled head (FusionHeadKernel) is not in use"})
            continue
        out.append(_compare(name, got[name], want[name], atol.get(name, fused.FUSED_ATOL)))
        out[-1]["tolerance"] = "L2_NORMALIZE_ATOL" if name in atol else "FUSED_ATOL"
    return out


def check_embed(engine: Path, samples: Path, limit: int | None, out: Path) -> dict:
    import sdk
    from sdk.errors import TruncationWarning

    records = [json.loads(line) for line in (samples / "items.jsonl").read_text().splitlines() if line.strip()]
    records = records[:limit] if limit else records
    t0 = time.perf_counter()
    with sdk.Embedder(engine, threads=1) as emb, warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        loaded = time.perf_counter()
        vectors = emb.embed_products(records, root=samples)  # (N, dim) float32
        backend, precision = emb.backend, emb.precision
    np.save(out / f"vectors-{engine.stem}.npy", vectors)
    return {"engine": engine.name, "products": len(records), "dim": int(vectors.shape[1]), "backend": backend,
            "precision": precision, "load_seconds": round(loaded - t0, 2),
            "embed_seconds": round(time.perf_counter() - loaded, 2)}


def check_cli(engine: Path) -> dict:
    """`python -m sdk inspect ENGINE` (the `moon3` command) in a child process of this interpreter."""
    import subprocess

    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sdk", "inspect", str(engine)], capture_output=True, text=True)
    return {"command": "python -m sdk inspect " + engine.name, "passed": done.returncode == 0 and "embedder:" in done.stdout,
            "exit": done.returncode, "seconds": round(time.perf_counter() - t0, 2),
            "output": (done.stdout or done.stderr).splitlines()[:3]}


def readme_blocks(text: str, heading: str = "Using an engine", lang: str = "python") -> list[tuple[int, str]]:
    """(first line, code) of each ```lang block in the README section whose heading starts with
    `heading`, up to the next heading of the same or a higher level."""
    level, fence, blocks = None, None, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                fence, start, code = line.strip()[3:].strip(), n + 1, []
            else:
                if level is not None and fence.split()[:1] == [lang]:
                    blocks.append((start, "\n".join(code) + "\n"))
                fence = None
            continue
        if fence is not None:
            code.append(line)
            continue
        m = re.match(r"(#+)\s+(.*)", line)
        if m and level is None and m.group(2).startswith(heading):
            level = len(m.group(1))
        elif m and level is not None and len(m.group(1)) <= level:
            break
    return blocks


def check_readme(readme: Path, engine: Path, inputs_root: Path) -> dict:
    """Run the README example as written in a scratch folder: the engine under each *.engine name
    it mentions, a copy of each input file it names (relative to `inputs_root`)."""
    blocks = readme_blocks(readme.read_text(encoding="utf-8"))
    if not blocks:
        return {"passed": False, "error": f"{readme.name} has no python block under 'Using an engine'"}
    here = os.getcwd()
    ns: dict = {"__name__": "readme_example"}
    printed = io.StringIO()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(printed):
        os.chdir(tmp)
        try:
            for line, code in blocks:
                tree = ast.parse(code, filename=str(readme))
                ast.increment_lineno(tree, line - 1)  # tracebacks point at README.md's lines
                for node in ast.walk(tree):
                    if isinstance(node, ast.Constant) and isinstance(node.value, str) and not Path(node.value).exists():
                        name = Path(node.value)
                        if name.suffix == ".engine":
                            src = engine
                        elif name.suffix.lower() in INPUT_SUFFIXES and (inputs_root / name).is_file():
                            src = inputs_root / name
                        else:
                            continue
                        name.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(src, name)
                exec(compile(tree, str(readme), "exec"), ns)
            emb = ns["emb"]
            result = {"passed": True, "blocks": len(blocks), "backend": emb.backend, "precision": emb.precision,
                      "shapes": {k: list(ns[k].shape) for k in ("v", "v64") if hasattr(ns.get(k), "shape")}}
        except Exception as exc:  # noqa: BLE001 - recorded, the caller fails the step
            result = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for obj in ns.values():
                if type(obj).__module__.startswith("sdk.") and callable(getattr(obj, "close", None)):
                    obj.close()
            os.chdir(here)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["printed"] = printed.getvalue().splitlines()[:20]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine", type=Path, action="append", default=[], help="repeat for several engines")
    ap.add_argument("--samples", type=Path, help="a folder with items.jsonl and the images it names")
    ap.add_argument("--limit", type=int, help="embed only the first N products")
    ap.add_argument("--readme", type=Path, help="README.md: run its 'Using an engine' example")
    ap.add_argument("--readme-engine", type=Path, help="the engine the example runs against (default: the first --engine)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"import": check_import()}
    report["ops"] = check_ops()
    if args.engine and args.samples:
        report["embed"] = [check_embed(e, args.samples, args.limit, args.out) for e in args.engine]
    if args.engine:
        report["cli"] = check_cli(args.engine[0])
    readme_engine = args.readme_engine or (args.engine[0] if args.engine else None)
    if readme_engine and args.readme:
        report["readme"] = check_readme(args.readme, readme_engine, args.readme.parent)
    report["import"]["torch_imported"] = "torch" in sys.modules  # after everything ran
    (args.out / "check.json").write_text(json.dumps(report, indent=1))
    ok = (report["import"]["have_c"] and not report["import"]["torch_imported"]
          and all(o["passed"] for o in report["ops"])
          and all(report.get(k, {"passed": True})["passed"] for k in ("cli", "readme")))
    print(json.dumps({"ok": ok, **{k: report[k] for k in ("import",)}}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
