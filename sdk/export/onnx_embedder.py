"""Export the whole embedder (image tower + text tower + fusion) as ONE ONNX graph, then prove it.

    graph = build_reference_graph()                       # real towers + committed fusion weights
    path = export_embedder_onnx(graph, OnnxExportConfig("moon3_embedder.onnx"))
    # -> moon3_embedder.onnx + moon3_embedder.parity.json (cosine vs PyTorch on other shapes)

Graph inputs (names are the ABI the runtime feeds; axes named batch / text_len / trace_len):
    pixels          (B, 3, H, W) float32   preprocessed as sdk.preprocess.image_to_array; zeros if absent
    input_ids       (B, T)       int64     title tokens, right-padded with 0
    attention_mask  (B, T)       int64     1 on real tokens (the tokenizer's mask, NOT multiplied by present)
    trace_ids       (B, S)       int64     reasoning-trace tokens, right-padded
    trace_mask      (B, S)       int64
    present         (B, 3)       float32   0/1 per modality: image, text, trace
Output:
    embedding       (B, out_dim) float32   L2-normalised

Exporter: torch.onnx.export(dynamo=True) (torch.export, non-strict). Measured with torch 2.13:
the TorchScript exporter (dynamo=False) cannot export the image tower at all — its
`adaptive_avg_pool2d(h, 7)` taps lose their spatial sizes once the batch axis is dynamic
("input size not accessible") — and it is deprecated, so it is kept only as the fallback of
`exporter="auto"` for towers it can handle. The dynamo exporter keeps text_len / trace_len
symbolic through transformers 5 BERT (bounded by its position table). One of its bugs is worked
around here: naming the output "embedding" through `output_names` collides with BERT's own Gather
value "embedding" and yields an invalid model (pytorch#158094), so the output is renamed in the
ONNX IR after freeing the name.
Whatever the exporter, parity on padded mixed-length batches of other shapes decides.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from sdk.contract import IMAGE, INPUT_NAMES, OUTPUT_NAME, TEXT, TRACE

from .onnx_tools import (
    PARITY_FORMAT,
    ExportError,
    check_valid,
    harmless_warnings_ignored,
    ort_session,
    rename_output,
    require,
    row_cosine,
    worst_cosine,
)

EXPORTERS = ("auto", "dynamo", "torchscript")
OPSET_MIN, OPSET_MAX = 18, 23  # the dynamo exporter's range in torch 2.13
TORCHSCRIPT_OPSET_MAX = 20
# (present image, text, trace) per row of a check batch, cycled: every absence pattern appears
_PRESENCE_CYCLE = ((1, 1, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1))


class EmbedderGraph(nn.Module):
    """The whole embedder as one module: pixels + token ids -> (B, out_dim) L2-normalised vectors.

    Composes an image tower (`sdk.train.towers.ImageTower` contract: pixels -> deep (B, N, Cd),
    shallow (B, N, Cs)), a BERT-like transformers encoder used for both the title and the
    reasoning trace (same weights), and a `FusionEmbedder` or `LinearEmbedder`.

    Args:
        image_tower: module returning (deep, shallow) token maps for (B, 3, H, W) pixels.
        text_encoder: transformers `AutoModel`-style encoder with `last_hidden_state`.
        fusion: the trained part (`sdk.train.fusion_model.FusionEmbedder` / `LinearEmbedder`).
    """

    def __init__(self, image_tower: nn.Module, text_encoder: nn.Module, fusion: nn.Module):
        super().__init__()
        self.image_tower = image_tower
        self.text_encoder = text_encoder
        self.fusion = fusion

    @property
    def out_dim(self) -> int:
        return int(self.fusion.cfg.out_dim)

    @property
    def vocab_size(self) -> int:
        return int(self.text_encoder.config.vocab_size)

    def forward(
        self,
        pixels: torch.Tensor,  # (B, 3, H, W) float32
        input_ids: torch.Tensor,  # (B, T) int64
        attention_mask: torch.Tensor,  # (B, T) int64
        trace_ids: torch.Tensor,  # (B, S) int64
        trace_mask: torch.Tensor,  # (B, S) int64
        present: torch.Tensor,  # (B, 3) float32
    ) -> torch.Tensor:
        deep, shallow = self.image_tower(pixels)  # (B, N, Cd), (B, N, Cs)
        # transformers 5 wants keyword arguments (positional ones shift under export).
        text_tok = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        trace_tok = self.text_encoder(input_ids=trace_ids, attention_mask=trace_mask).last_hidden_state
        # As ReferenceEmbedder._text_states: the encoder sees the tokenizer's mask, the fusion
        # sees it multiplied by presence (an absent text is the tokenized "" and must not count).
        text_m = attention_mask.to(text_tok.dtype) * present[:, TEXT : TEXT + 1]  # (B, T)
        trace_m = trace_mask.to(trace_tok.dtype) * present[:, TRACE : TRACE + 1]  # (B, S)
        return self.fusion(deep, shallow, text_tok, text_m, trace_tok, trace_m, present)  # (B, out_dim)


@dataclass
class OnnxExportConfig:
    """How to export an `EmbedderGraph` to ONNX and how hard to check it.

    Attributes:
        output: the .onnx file to write (weights inline: one file); the parity report is written
            beside it as `<stem>.parity.json`.
        opset: ONNX opset (18..23; the TorchScript fallback handles <= 20).
        exporter: "dynamo", "torchscript", or "auto" (dynamo, then torchscript if dynamo fails).
        batch_axis, text_axis, trace_axis: names of the dynamic axes in the ONNX graph.
        image_size: side of the square pixels input (static; EfficientNet-Lite0 uses 224).
        example_batch, example_text_len, example_trace_len: shape of the PADDED tracing example
            (rows of several lengths); >= 2 each and pairwise distinct so no axis is specialised.
        check_batches: (batch, text_len, trace_len) of the parity batches; each differs from the
            tracing example, so the dynamic axes are exercised.
        min_cosine: per-row cosine gate, ONNX Runtime vs PyTorch.
        seed: seed of the random example and check batches.
        num_threads: ONNX Runtime intra-op threads for the check (0 = its default).
    """

    output: str | Path
    opset: int = 18
    exporter: str = "auto"
    batch_axis: str = "batch"
    text_axis: str = "text_len"
    trace_axis: str = "trace_len"
    image_size: int = 224
    example_batch: int = 4
    example_text_len: int = 7
    example_trace_len: int = 10
    check_batches: tuple[tuple[int, int, int], ...] = ((1, 5, 3), (5, 11, 2), (2, 3, 16), (7, 16, 6))
    min_cosine: float = 0.9999
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.output.suffix != ".onnx":
            raise ValueError(f"output must be a .onnx file, got {str(self.output)!r}")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not OPSET_MIN <= self.opset <= OPSET_MAX:
            raise ValueError(f"opset must be an int in [{OPSET_MIN}, {OPSET_MAX}], got {self.opset!r}")
        if self.exporter == "torchscript" and self.opset > TORCHSCRIPT_OPSET_MAX:
            raise ValueError(f"the torchscript exporter handles opset <= {TORCHSCRIPT_OPSET_MAX}, got {self.opset}")
        axes = (self.batch_axis, self.text_axis, self.trace_axis)
        for a in axes:
            if not isinstance(a, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", a):
                raise ValueError(f"dynamic axis names must be identifiers, got {a!r}")
        if len(set(axes)) != 3:
            raise ValueError(f"dynamic axis names must be distinct, got {axes}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024], got {self.image_size}")
        example = (self.example_batch, self.example_text_len, self.example_trace_len)
        if min(example) < 2:
            # torch.export specialises size-1 axes, and padding needs >= 2 rows and tokens
            raise ValueError(f"example_batch/text_len/trace_len must be >= 2 (a padded example), got {example}")
        if len(set(example)) != 3:
            raise ValueError(f"example_batch/text_len/trace_len must be pairwise distinct, got {example}")
        self.check_batches = tuple(tuple(int(v) for v in shape) for shape in self.check_batches)
        if not self.check_batches:
            raise ValueError("check_batches must hold at least one (batch, text_len, trace_len)")
        for shape in self.check_batches:
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"each check batch is (batch, text_len, trace_len) >= 1, got {shape}")
            if shape == example:
                raise ValueError(f"check batch {shape} equals the tracing example; it would not test the dynamic axes")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")

    @property
    def parity_path(self) -> Path:
        return self.output.with_suffix(".parity.json")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        b, t, s = self.batch_axis, self.text_axis, self.trace_axis
        return {
            "pixels": {0: b},
            "input_ids": {0: b, 1: t},
            "attention_mask": {0: b, 1: t},
            "trace_ids": {0: b, 1: s},
            "trace_mask": {0: b, 1: s},
            "present": {0: b},
            OUTPUT_NAME: {0: b},
        }


def make_padded_batch(
    batch: int,
    text_len: int,
    trace_len: int,
    *,
    vocab_size: int,
    image_size: int = 224,
    seed: int = 0,
    presence: Iterable[tuple[int, int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """A random, right-padded, mixed-length feed in the graph's input format.

    Row 0 fills both sequences (so the batch really has those lengths); with batch >= 2 row 1 is
    padded in both. Presence cycles through every absence pattern unless `presence` is given;
    absent images are zero pixels and absent texts are 2 tokens ([CLS] [SEP]), as the reference
    embedder feeds them.

    Returns:
        dict of numpy arrays keyed by INPUT_NAMES.
    """
    rng = np.random.default_rng(seed)
    pres = list(presence) if presence is not None else [_PRESENCE_CYCLE[i % len(_PRESENCE_CYCLE)] for i in range(batch)]
    if len(pres) != batch:
        raise ValueError(f"presence has {len(pres)} rows, batch is {batch}")
    present = np.asarray(pres, np.float32).reshape(batch, 3)
    pixels = rng.uniform(-1.0, 1.0, (batch, 3, image_size, image_size)).astype(np.float32)
    pixels[present[:, IMAGE] == 0] = 0.0

    def tokens(length: int, col: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((batch, length), np.int64)
        mask = np.zeros((batch, length), np.int64)
        for i in range(batch):
            if i == 0:
                n = length
            elif present[i, col] == 0:
                n = min(2, length)
            elif i == 1:
                n = max(1, length // 2)
            else:
                n = int(rng.integers(1, length + 1))
            ids[i, :n] = rng.integers(1, vocab_size, n)
            mask[i, :n] = 1
        return ids, mask

    input_ids, attention_mask = tokens(text_len, TEXT)
    trace_ids, trace_mask = tokens(trace_len, TRACE)
    return {
        "pixels": pixels,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "trace_ids": trace_ids,
        "trace_mask": trace_mask,
        "present": present,
    }


def verify_embedder_onnx(
    graph: nn.Module,
    onnx_path: str | Path,
    cfg: OnnxExportConfig,
    feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Compare an exported graph with its PyTorch module, row by row, on padded batches.

    Args:
        graph: the source module (an `EmbedderGraph`), put in eval mode.
        onnx_path: the exported model.
        cfg: gives `min_cosine`, and (when `feeds` is None) the shapes of the random check batches.
        feeds: optional batches to check instead (dicts keyed by INPUT_NAMES), e.g. real products.

    Returns:
        the parity report: per batch and overall min/mean cosine and max abs error, `passed`.

    Raises:
        ExportError: ONNX Runtime cannot load or run the model, a shape differs, or a row's
            cosine is below `cfg.min_cosine` (the message names the batch and the worst cosine;
            `.report` holds the full report, with "passed": false).
    """
    onnx_path = Path(onnx_path)
    sess = ort_session(onnx_path, cfg.num_threads)
    if feeds is None:
        vocab = int(graph.text_encoder.config.vocab_size)
        feeds = [
            make_padded_batch(b, t, s, vocab_size=vocab, image_size=cfg.image_size, seed=cfg.seed + 1 + k)
            for k, (b, t, s) in enumerate(cfg.check_batches)
        ]
    graph.eval()
    batches, cos_all, worst_err = [], [], 0.0
    failure = None
    for k, feed in enumerate(feeds):
        feed = {name: np.ascontiguousarray(feed[name]) for name in INPUT_NAMES}
        shape = {"batch": int(feed["input_ids"].shape[0]), "text_len": int(feed["input_ids"].shape[1]),
                 "trace_len": int(feed["trace_ids"].shape[1])}
        where = f"check batch {k} (batch={shape['batch']}, text_len={shape['text_len']}, trace_len={shape['trace_len']})"
        got = _run_onnx(sess, feed)
        with torch.inference_mode():
            want = graph(*(torch.from_numpy(feed[name]) for name in INPUT_NAMES)).float().numpy()
        if got.shape != want.shape:
            raise ExportError(f"ONNX parity failed for {onnx_path.name} on {where}: output shape {got.shape}, "
                              f"PyTorch gives {want.shape}")
        cos = row_cosine(got, want)
        err = float(np.abs(got.astype(np.float64) - want).max()) if got.size else 0.0
        worst = int(np.nanargmin(cos)) if np.isfinite(cos).any() else 0
        worst_cos = worst_cosine(cos)
        batches.append({**shape, "min_cosine": worst_cos, "mean_cosine": float(cos.mean()),
                        "max_abs_err": err, "worst_row": worst})
        cos_all.append(cos)
        worst_err = max(worst_err, err) if np.isfinite(err) else float("nan")
        # `not >=` so a NaN cosine fails too
        if failure is None and not bool(np.all(cos >= cfg.min_cosine)):
            failure = (f"ONNX parity failed for {onnx_path.name} on {where}: worst cosine {worst_cos:.6f} "
                       f"(row {worst}) < min_cosine {cfg.min_cosine}; max abs error {err:.3g}")
    if not batches:
        raise ExportError("verify_embedder_onnx got no batches to check")
    cos = np.concatenate(cos_all)
    report = {
        "format": PARITY_FORMAT,
        "model": onnx_path.name,
        "min_cosine_gate": cfg.min_cosine,
        "min_cosine": worst_cosine(cos),
        "mean_cosine": float(cos.mean()),
        "max_abs_err": worst_err,
        "rows": int(cos.size),
        "batches": batches,
        "passed": failure is None,
    }
    if failure is not None:
        report["failure"] = failure
        raise ExportError(failure, report)
    return report


def export_embedder_onnx(graph: nn.Module, cfg: OnnxExportConfig) -> Path:
    """Export `graph` (an `EmbedderGraph`) to one ONNX file and check it against PyTorch.

    Traces on a padded, mixed-length example batch (cfg.example_*), makes batch / text_len /
    trace_len dynamic, then runs ONNX Runtime and the module on `cfg.check_batches` (other
    shapes, batch 1 included, rows with absent modalities) and writes `<stem>.parity.json`.

    Args:
        graph: the module to export; it is switched to eval mode.
        cfg: output path, opset, exporter, axis names and the parity gate.

    Returns:
        the path of the written .onnx file (cfg.output).

    Raises:
        ExportError: the exporter failed, the file is malformed, or parity is below
            cfg.min_cosine (the report is still written, with "passed": false).
        BackendUnavailableError: onnx or onnxruntime is missing.
    """
    require("onnx", "ONNX export needs onnx: pip install 'moon3-sdk[export]'")
    graph.eval()
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    example = make_padded_batch(
        cfg.example_batch, cfg.example_text_len, cfg.example_trace_len,
        vocab_size=int(graph.text_encoder.config.vocab_size), image_size=cfg.image_size, seed=cfg.seed,
    )
    args = tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES)
    # a stale model or report from an earlier run must not survive a failed export
    cfg.output.unlink(missing_ok=True)
    cfg.parity_path.unlink(missing_ok=True)
    errors: list[str] = []
    last: Exception | None = None
    for exporter in ("dynamo", "torchscript") if cfg.exporter == "auto" else (cfg.exporter,):
        export_warnings: list[str] = []
        try:
            export_warnings = (_export_dynamo if exporter == "dynamo" else _export_torchscript)(graph, args, cfg)
            _check_structure(cfg.output)
            report = verify_embedder_onnx(graph, cfg.output, cfg)
        except ExportError as exc:
            if exc.report is not None:  # keep the evidence beside the failing model
                meta = _export_meta(exporter, cfg, export_warnings)
                cfg.parity_path.write_text(json.dumps({**exc.report, **meta}, indent=2))
            errors.append(f"{exporter}: {exc}")
            last = exc
            continue
        except Exception as exc:  # noqa: BLE001 - an exporter crash becomes an ExportError naming it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(f"{exporter} exporter failed: {type(exc).__name__}: {first}")
            last = exc
            continue
        cfg.parity_path.write_text(json.dumps({**report, **_export_meta(exporter, cfg, export_warnings)}, indent=2))
        if errors:
            warnings.warn(f"ONNX export fell back to the {exporter} exporter ({'; '.join(errors)})", stacklevel=2)
        return cfg.output
    raise ExportError("; ".join(errors)) from last


def build_reference_graph(weights_dir: str | Path | None = None) -> nn.Module:
    """The real embedder as one module: EfficientNet-Lite0 + MiniLM + the committed fusion weights.

    Args:
        weights_dir: folder with `embedder.safetensors` + `embedder.json` (default: the committed
            `sdk/train/weights`).

    Returns:
        an `EmbedderGraph` in eval mode, giving the vectors `ReferenceEmbedder` gives for the same
        preprocessed pixels and token ids.

    Raises:
        FileNotFoundError: the fusion weights are missing.
        BackendUnavailableError: a tower's package is not installed.
    """
    from sdk.train.fusion_model import load_embedder
    from sdk.train.towers import load_towers

    if weights_dir is None:
        from sdk.paths import WEIGHTS

        weights_dir = WEIGHTS
    fusion = load_embedder(weights_dir)
    return EmbedderGraph(*load_towers(fusion.cfg, fusion), fusion).eval()


# ---------------------------------------------------------------------------------------------
# internals


def _run_onnx(sess, feed: Mapping[str, np.ndarray]) -> np.ndarray:
    try:
        return np.asarray(sess.run([OUTPUT_NAME], dict(feed))[0])
    except Exception as exc:  # noqa: BLE001
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        raise ExportError(f"ONNX Runtime failed on inputs {shapes}: {exc}") from exc


def _export_dynamo(graph, args, cfg: OnnxExportConfig) -> list[str]:
    from torch.export import Dim

    # Bounds given up front: BERT's position table caps both lengths, and a Dim without that max
    # makes torch.export fail once before torch.onnx refines it from the suggested fix (2x the time).
    max_len = int(getattr(graph.text_encoder.config, "max_position_embeddings", 0)) or None
    dims = {
        cfg.batch_axis: Dim(cfg.batch_axis, min=1),
        cfg.text_axis: Dim(cfg.text_axis, min=1, max=max_len),
        cfg.trace_axis: Dim(cfg.trace_axis, min=1, max=max_len),
    }
    axes = cfg.dynamic_axes()
    dynamic_shapes = {name: {i: dims[a] for i, a in axes[name].items()} for name in INPUT_NAMES}
    with harmless_warnings_ignored(), torch.no_grad():
        # Input names come from forward's parameters; `output_names` is not passed (pytorch#158094).
        program = torch.onnx.export(
            graph, args, dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=cfg.opset,
            optimize=True, verbose=False,
        )
    rename_output(program.model, OUTPUT_NAME)
    program.save(str(cfg.output), external_data=False)
    return []  # unknown warnings were not caught: they reached the caller


def _export_torchscript(graph, args, cfg: OnnxExportConfig) -> list[str]:
    if cfg.opset > TORCHSCRIPT_OPSET_MAX:
        raise ExportError(f"the torchscript exporter handles opset <= {TORCHSCRIPT_OPSET_MAX}, got {cfg.opset}")
    # The deprecated tracer warns at length (TracerWarning on every Python branch frozen at the
    # example's shapes, aten::index caveats, its own deprecation). Whether any of it matters is
    # exactly what the parity check on other shapes decides, so the warnings are recorded in the
    # parity report rather than raised; the fallback itself is announced by one warning.
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(
            graph, args, str(cfg.output), dynamo=False, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_axes=cfg.dynamic_axes(), opset_version=cfg.opset, do_constant_folding=True,
        )
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught})


def _check_structure(path: Path) -> None:
    """Reject files the checker rejects or where a value name is defined twice (exporter name clashes)."""
    import onnx

    check_valid(path)
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    names = [i.name for i in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output if o]
    seen, dup = set(), set()
    for n in names:
        (dup if n in seen else seen).add(n)
    if dup:
        raise ExportError(f"{path}: value names defined more than once: {sorted(dup)[:5]}")
    got_in, got_out = [i.name for i in g.input], [o.name for o in g.output]
    if got_in != list(INPUT_NAMES) or got_out != [OUTPUT_NAME]:
        raise ExportError(f"{path}: inputs {got_in} / outputs {got_out}, expected {list(INPUT_NAMES)} / [{OUTPUT_NAME!r}]")


def _export_meta(exporter: str, cfg: OnnxExportConfig, export_warnings: list[str]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {
        "exporter": exporter,
        "opset": cfg.opset,
        "inputs": list(INPUT_NAMES),
        "outputs": [OUTPUT_NAME],
        "dynamic_axes": {k: {str(i): a for i, a in d.items()} for k, d in cfg.dynamic_axes().items()},
        "example_shape": [cfg.example_batch, cfg.example_text_len, cfg.example_trace_len],
        "export_warnings": export_warnings,
        "versions": {p: v(p) for p in ("moon3-sdk", "torch", "transformers", "onnx", "onnxscript", "onnxruntime")},
    }
