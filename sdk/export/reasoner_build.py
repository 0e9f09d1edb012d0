"""The reasoner's part of an engine: export the trained reasoner (visual + step graphs, greedy
parity against PyTorch), quantize it (`sdk.export.reasoner_quant`), gate the quantized one against
the FP32 one through `sdk.Reasoner`; and reasoner-only engines for benchmarks.

    python -m sdk.export.reasoner_build --out-dir runs/reasoner-engines --precision fp32 int8 int4
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sdk.train.eval_reasoner import ReasonerGates

from ..paths import REASONER_WEIGHTS
from .gates import GateError
from .reasoner_quant import REASONER_PRECISIONS, ReasonerQuantConfig, quantize_reasoner

if TYPE_CHECKING:
    from .build_config import BuildConfig


def reasoner_section(folder: Path, work: Path, cfg: BuildConfig, log=print) -> tuple[dict, dict[str, bytes]]:
    """Export the trained reasoner in `folder`, quantize and gate it as cfg says; ({"reasoner": section}, parts).

    Raises:
        GateError: the quantized reasoner failed its gates against the FP32 one and cfg.enforce.
    """
    from sdk.train.eval_reasoner import eval_records
    from sdk.train.reasoner_model import TASKS, load_reasoner
    from sdk.train.towers import load_image_tower

    from .bundle import package_reasoner, reasoner_parts
    from .onnx_reasoner import ReasonerExportConfig, export_reasoner_onnx

    log(f"[+] reasoner: {folder} -> visual + step graphs, greedy parity vs PyTorch")
    model, tok = load_reasoner(folder)
    heads, heads_meta = load_heads(cfg.heads_dir(), log)
    export_reasoner_onnx(load_image_tower(), model, ReasonerExportConfig(work / "fp32"), heads=heads)
    parity = json.loads((work / "fp32" / "reasoner.parity.json").read_text())
    report = folder / "reasoner_report.json"
    metrics = json.loads(report.read_text()) if report.is_file() else {}
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    common = dict(tasks=TASKS, max_len=model.cfg.max_len, parity=parity, metrics=metrics, heads=heads_meta)
    tok_json = tok.to_str().encode()
    del model
    qcfg = cfg.reasoner_quant()
    if qcfg.precision == "fp32":
        section, parts = reasoner_parts(work / "fp32", tok_json, **common)
        return {"reasoner": section}, parts
    log(f"[+] reasoner: quantize {qcfg.label()} with onnxruntime's quantizer")
    quant = quantize_reasoner(work / "fp32", work / qcfg.precision, qcfg)
    for name, info in quant["parts"].items():
        log(f"      {name}: {info['quantized_ops']} quantized, {info['fp32_weight_matmuls']} FP32 weight matmuls, "
            f"{info['bytes'] / 2**20:.1f} MiB")
    records = eval_records(cfg.catalog, None if cfg.catalog else cfg.samples, cfg.reasoner_eval_items)
    log(f"[+] reasoner fidelity: {qcfg.precision} vs FP32 through sdk.Reasoner on {len(records)} products "
        f"({cfg.catalog or cfg.samples})")
    engines = {}
    for name, graphs, q in (("fp32", work / "fp32", None), (qcfg.precision, work / qcfg.precision, quant)):
        sec, prt = reasoner_parts(graphs, tok_json, **common, precision=name, quantization=q)
        engines[name] = package_reasoner(work / f"{name}.engine", sec, prt)
    verdict = gate_reasoner(engines["fp32"], engines[qcfg.precision], records, cfg.reasoner_gates, label=qcfg.label(),
                            enforce=cfg.enforce, threads=cfg.threads, log=log)
    verdict["eval_source"] = str(cfg.catalog or cfg.samples)
    quant["fidelity"] = verdict
    section, parts = reasoner_parts(work / qcfg.precision, tok_json, **common, precision=qcfg.precision,
                                    quantization=quant)
    return {"reasoner": section}, parts


def load_heads(folder: Path | None, log=print):
    """(module, the manifest's "heads" record) of the attribute heads in `folder`, or (None, None).

    Raises:
        ExportError: `folder` holds no heads, or they read other features than the reasoner's image tower gives.
    """
    if folder is None:
        return None, None
    from sdk.train.attribute_heads import FEATURE, HEADS_FILE, HEADS_META, load_heads_module
    from sdk.train.reasoner_model import MAX_ATTRIBUTES

    from .onnx_tools import ExportError

    missing = [name for name in (HEADS_META, HEADS_FILE) if not (Path(folder) / name).is_file()]
    if missing:
        raise ExportError(f"{folder} holds no attribute heads (no {' or '.join(missing)}); write them with "
                          "`python -m sdk.train.attribute_heads ... --out DIR`, or build with --no-attribute-heads")
    module, meta = load_heads_module(folder)
    if meta.get("feature") != FEATURE or meta.get("dims") != 1280:
        raise ExportError(f"the attribute heads in {folder} read {meta.get('feature')!r} ({meta.get('dims')} dims); "
                          f"the reasoner's visual graph gives {FEATURE!r} (1280)")
    log(f"[+] reasoner: attribute heads from {folder} ({len(meta['fields'])} fields) in the visual graph")
    record = {"output": "attributes", "feature": meta["feature"],
              "fields": [[f["key"], f["classes"], f["threshold"]] for f in meta["fields"]], "max_pairs": MAX_ATTRIBUTES,
              **({"validation": meta["validation"]} if "validation" in meta else {})}
    return module, record


def build_reasoner_engines(folder: str | Path, out_dir: str | Path, precisions=REASONER_PRECISIONS,
                           quant: ReasonerQuantConfig | None = None, log=print) -> dict[str, Path]:
    """Engines holding only the reasoner in `folder`, one per precision (exported once, greedy parity
    checked, then quantized; no gate): `out_dir/reasoner-{precision}.engine`. For benchmarks and
    `python -m sdk.train.eval_reasoner`; `build_engine` is what gates and ships."""
    from sdk.train.reasoner_model import TASKS, load_reasoner
    from sdk.train.towers import load_image_tower

    from .bundle import package_reasoner, reasoner_parts
    from .onnx_reasoner import ReasonerExportConfig, export_reasoner_onnx

    out_dir = Path(out_dir)
    model, tok = load_reasoner(folder)
    out = {}
    with tempfile.TemporaryDirectory(prefix="moon3-reasoner-") as tmp:
        work = Path(tmp)
        log(f"reasoner: {folder} -> visual + step graphs, greedy parity vs PyTorch")
        export_reasoner_onnx(load_image_tower(), model, ReasonerExportConfig(work / "fp32"))
        parity = json.loads((work / "fp32" / "reasoner.parity.json").read_text())
        for precision in precisions:
            qcfg = dataclasses.replace(quant or ReasonerQuantConfig(), precision=precision)
            record = quantize_reasoner(work / "fp32", work / precision, qcfg)
            section, parts = reasoner_parts(work / precision, tok.to_str().encode(), tasks=TASKS,
                                            max_len=model.cfg.max_len, parity=parity, precision=precision,
                                            quantization=record if precision != "fp32" else None)
            out_dir.mkdir(parents=True, exist_ok=True)
            out[precision] = package_reasoner(out_dir / f"reasoner-{precision}.engine", section, parts)
            log(f"wrote {out[precision]} ({out[precision].stat().st_size / 2**20:.2f} MiB, {qcfg.label()})")
    return out


def gate_reasoner(reference: Path, candidate: Path, records: list[dict], gates: ReasonerGates, *, label: str,
                  enforce: bool = True, threads: int = 0, log=print) -> dict:
    """Measure a quantized reasoner engine against the FP32 one through `sdk.Reasoner` and apply the gates.

    Returns:
        The verdict (`sdk.train.eval_reasoner.gate`): both engines' metrics, drops, token agreement.

    Raises:
        GateError: a gate failed and `enforce` (the message names the failed gates and the drops).
    """
    from sdk.train.eval_reasoner import agreement, evaluate_engine, format_metrics, gate

    measured = {}
    for name, engine in (("fp32", reference), (label, candidate)):
        measured[name] = evaluate_engine(engine, records, threads=threads or None, trace_items=min(100, len(records)))
        log(f"      {name}: {format_metrics(measured[name][0])}")
    (ref, ref_out), (cand, cand_out) = measured["fp32"], measured[label]
    verdict = gate(ref, cand, agreement(cand_out, ref_out), gates, n_items=len(records))
    ag = verdict["agreement"]
    log(f"      agreement: {ag['exact']:.4f} of generations identical, {ag['tokens']:.4f} of tokens -> "
        f"{'passed' if verdict['passed'] else 'failed: ' + '; '.join(verdict['failed'])}")
    if not verdict["passed"]:
        d = verdict["drop"]
        msg = (f"the {label} reasoner failed its gates against the FP32 reasoner on {len(records)} products: "
               f"{'; '.join(verdict['failed'])} (attribute F1 photo {ref['attribute_f1_photo']:.4f} -> "
               f"{cand['attribute_f1_photo']:.4f}, title {ref['attribute_f1_title']:.4f} -> "
               f"{cand['attribute_f1_title']:.4f}; "
               f"category accuracy drops {d['category_acc_photo']:+.4f} / {d['category_acc_title']:+.4f})")
        if enforce:
            raise GateError(msg + " (nothing written; --no-enforce writes it anyway, "
                            "--reasoner-precision fp32 ships the FP32 reasoner)", verdict)
        log(f"WARNING: {msg}; written anyway (--no-enforce)")
    return verdict


def main(argv=None) -> int:
    import argparse

    d = ReasonerQuantConfig()
    ap = argparse.ArgumentParser(prog="python -m sdk.export.reasoner_build",
                                 description="write reasoner-only engines (out-dir/reasoner-PRECISION.engine), no gate")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--reasoner", type=Path, default=REASONER_WEIGHTS)
    ap.add_argument("--precision", nargs="+", choices=REASONER_PRECISIONS, default=list(REASONER_PRECISIONS))
    ap.add_argument("--block-size", type=int, default=d.block_size)
    ap.add_argument("--lm-head", action="store_true", help="quantize the tied LM head too")
    ap.add_argument("--accuracy-level", type=int, default=d.accuracy_level, help="-1: unset (FP32 activations)")
    ap.add_argument("--symmetric", action="store_true")
    a = ap.parse_args(argv)
    q = ReasonerQuantConfig("int4", a.block_size, a.lm_head, None if a.accuracy_level < 0 else a.accuracy_level,
                            a.symmetric)
    build_reasoner_engines(a.reasoner, a.out_dir, a.precision, q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
