"""Write an embedder engine (`moon3.engine`) from an exported ONNX graph and its tokenizer.

The manifest written here is the contract the runtime (`sdk.Embedder`) reads:

    manifest["embedder"] = {
        "part": "embedder.onnx",            # ONNX graph part (layout "single", the default)
        "precision": "fp32" | "int8-dynamic" | ...,
        "inputs": {name: {"dtype", "shape"}},  # pixels, input_ids, attention_mask, trace_ids,
                                               # trace_mask, present (see EmbedderGraph.forward)
        "output": "embedding",
        "dim": 256, "matryoshka_dims": [64, 128, 256],
        "modalities": ["image", "text", "trace"],
    }
    # layout "split" (package_split_embedder) has instead:
    #   "layout": "split", "parts": {"image": "image.onnx", "text": "text.onnx", "head": "head.npz"}
    #   image.onnx: pixels -> image_tokens; text.onnx: input_ids, attention_mask -> token_states;
    #   head.npz: sdk.head.FusionHead weights (see sdk.export.onnx_split)
    manifest["preprocess"] = {
        "image": {"size", "resize", "scale", "mean", "std"},   # sdk.preprocess.ImagePreprocess
        "text": {"tokenizer": "tokenizer.json", "max_length": 32},
        "trace": {"tokenizer": "tokenizer.json", "max_length": 128},
    }
    manifest["completion"] = {       # optional, split layout only (completion_parts)
        "part": "completion.onnx", "completes": "image",  # token_states, attention_mask -> image_tokens
        "embedder_sha256", "parity", "metrics"}
    manifest["fidelity"] = {...}   # measured against the FP32 teacher at build time
    manifest["versions"] = {"sdk", "onnx", "onnxruntime", "torch", "transformers"}
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path
from typing import Any, Mapping, Sequence

from sdk.contract import EMBEDDER_INPUTS, MODALITIES, OUTPUT_NAME, SINGLE_PART, SPLIT_PARTS, TOKENIZER_PART
from sdk.engine import FORMAT_VERSION, write_engine
from sdk.preprocess import ImagePreprocess
from sdk.version import library_versions


def package_embedder(
    out: str | Path,
    onnx_model: bytes,
    tokenizer_json: bytes,
    *,
    dim: int,
    matryoshka_dims: Sequence[int],
    precision: str = "fp32",
    image: ImagePreprocess = ImagePreprocess(),
    text_max_length: int = 32,
    trace_max_length: int = 128,
    fidelity: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    extra_parts: Mapping[str, bytes] | None = None,
    trace_trained: bool = False,
) -> Path:
    """Write a `moon3.engine` holding one embedder graph.

    Args:
        out: engine file to write.
        onnx_model: the serialized ONNX graph (inputs as in `EMBEDDER_INPUTS`, output "embedding").
        tokenizer_json: the `tokenizers` JSON of the text tower.
        dim: embedding width; matryoshka_dims: valid prefix widths (the last equals dim).
        precision: label of the graph's precision.
        image: image preprocessing the graph expects.
        text_max_length / trace_max_length: token budget of title text and reasoning trace.
        fidelity: the fidelity report measured against the FP32 teacher.
        extra: more manifest keys (e.g. "build" settings, "reasoner").
        extra_parts: more parts (e.g. the reasoner's, from `reasoner_parts`).
        trace_trained: the embedder was trained with reasoning traces (`sdk.Pipeline` reasons only then).

    Returns:
        The path written.

    Raises:
        ValueError: inconsistent dims or lengths.
    """
    embedder = {"part": SINGLE_PART, "precision": precision, "inputs": EMBEDDER_INPUTS, "output": OUTPUT_NAME}
    manifest = _manifest(embedder, dim=dim, matryoshka_dims=matryoshka_dims, image=image, text_max_length=text_max_length,
                         trace_max_length=trace_max_length, fidelity=fidelity, extra=extra, trace_trained=trace_trained)
    return write_engine(out, manifest, {SINGLE_PART: onnx_model, TOKENIZER_PART: tokenizer_json,
                                        **dict(extra_parts or {})})


def package_split_embedder(
    out: str | Path, image_onnx: bytes, text_onnx: bytes, head: bytes, tokenizer_json: bytes, **options: Any
) -> Path:
    """Write a `moon3.engine` holding a split embedder (see `sdk.export.onnx_split`).

    Args:
        image_onnx: graph pixels -> image_tokens; text_onnx: graph input_ids, attention_mask ->
            token_states; head: `sdk.head.FusionHead.to_bytes()`. The keyword options (dim,
            matryoshka_dims, precision, image, text_max_length, trace_max_length, fidelity, extra, trace_trained,
            extra_parts) are those of `package_embedder`.

    Returns:
        The path written.

    Raises:
        ValueError: inconsistent dims or lengths.
    """
    extra_parts = options.pop("extra_parts", None)
    embedder = {"layout": "split", "parts": dict(SPLIT_PARTS), "precision": options.pop("precision", "fp32"),
                "output": OUTPUT_NAME}
    manifest = _manifest(embedder, **options)
    graphs = {"image": image_onnx, "text": text_onnx, "head": head}
    parts = {**{SPLIT_PARTS[k]: v for k, v in graphs.items()}, TOKENIZER_PART: tokenizer_json, **dict(extra_parts or {})}
    return write_engine(out, manifest, parts)


def reasoner_parts(folder: str | Path, tokenizer_json: bytes, *, tasks: Mapping[str, str], max_len: int,
                   image: ImagePreprocess = ImagePreprocess(), parity: Mapping[str, Any] | None = None,
                   metrics: Mapping[str, Any] | None = None, precision: str = "fp32",
                   quantization: Mapping[str, Any] | None = None, heads: Mapping[str, Any] | None = None
                   ) -> tuple[dict, dict[str, bytes]]:
    """The manifest's "reasoner" section and its parts, from the graphs in `folder` (written by
    `sdk.export.onnx_reasoner.export_reasoner_onnx`, or quantized by `sdk.export.reasoner_quant`).

    Pass them to `package_embedder` / `package_split_embedder` as `extra={"reasoner": section}`
    and `extra_parts=parts`; `sdk.Reasoner` reads them. `precision` ("fp32", "int8", "int4") and
    `quantization` (what was quantized, per part, and the fidelity gate) are recorded as given.
    """
    from .onnx_reasoner import STEP_PART, VISUAL_PART

    folder = Path(folder)
    names = {"visual": VISUAL_PART, "prefill": STEP_PART, "decode": STEP_PART, "tokenizer": "reasoner_tokenizer.json"}
    parts = {names[k]: (folder / names[k]).read_bytes() for k in ("visual", "decode")}
    parts[names["tokenizer"]] = tokenizer_json
    section = {"parts": names, "tasks": dict(tasks), "max_len": int(max_len), "image": dataclasses.asdict(image),
               "decoding": "greedy", "precision": precision, "parity": dict(parity or {}),
               "metrics": dict(metrics or {})}
    if quantization:
        section["quantization"] = dict(quantization)
    if heads:  # the visual graph's "attributes" output: [key, classes ("absent" first), threshold] per field
        section["heads"] = dict(heads)
    return section, parts


def completion_parts(onnx_path: str | Path, *, embedder_sha256: str, parity: Mapping[str, Any] | None = None,
                     metrics: Mapping[str, Any] | None = None) -> tuple[dict, dict[str, bytes]]:
    """The manifest's "completion" section and its part, from the graph written by
    `sdk.export.onnx_completion.export_completion_onnx`.

    Pass them to `package_split_embedder` as `extra={"completion": section}` and `extra_parts=parts`;
    `sdk.Embedder(...).embed(..., complete_missing="image")` runs it.
    """
    from .onnx_completion import COMPLETION_INPUTS, COMPLETION_OUTPUT, COMPLETION_PART

    section = {"part": COMPLETION_PART, "completes": "image", "inputs": list(COMPLETION_INPUTS),
               "output": COMPLETION_OUTPUT, "embedder_sha256": embedder_sha256, "parity": dict(parity or {}),
               "metrics": dict(metrics or {})}
    return section, {COMPLETION_PART: Path(onnx_path).read_bytes()}


def package_reasoner(out: str | Path, section: Mapping[str, Any], parts: Mapping[str, bytes]) -> Path:
    """Write an engine holding only a reasoner (from `reasoner_parts`): what the build measures a
    quantized reasoner with, through `sdk.Reasoner`, before it goes into the full engine."""
    manifest = {"format": "moon3.engine", "format_version": FORMAT_VERSION, "versions": library_versions(),
                "reasoner": dict(section)}
    return write_engine(out, manifest, dict(parts))


def _manifest(embedder: dict, *, dim: int, matryoshka_dims: Sequence[int], image: ImagePreprocess = ImagePreprocess(),
              text_max_length: int = 32, trace_max_length: int = 128, fidelity: Mapping[str, Any] | None = None,
              extra: Mapping[str, Any] | None = None, trace_trained: bool = False) -> dict:
    dims = [int(d) for d in matryoshka_dims]
    if not dims or dims[-1] != dim or dims != sorted(set(dims)):
        raise ValueError(f"matryoshka_dims must be increasing and end at dim={dim}, got {dims}")
    if text_max_length < 2 or trace_max_length < 2:
        raise ValueError(f"token budgets must be >= 2, got text {text_max_length}, trace {trace_max_length}")
    return {
        "format": "moon3.engine",
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "embedder": {
            **embedder,
            "dim": int(dim),
            "matryoshka_dims": dims,
            "modalities": list(MODALITIES),
            "trace_trained": bool(trace_trained),
        },
        "preprocess": {
            "image": dataclasses.asdict(image),
            "text": {"tokenizer": TOKENIZER_PART, "max_length": int(text_max_length)},
            "trace": {"tokenizer": TOKENIZER_PART, "max_length": int(trace_max_length)},
        },
        "fidelity": dict(fidelity or {}),
        **dict(extra or {}),
    }
