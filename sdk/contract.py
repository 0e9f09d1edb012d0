"""The embedder contract: what an engine's manifest and graphs promise, in one place.

The engine writer (`sdk.export.bundle`, `sdk.export.onnx_embedder`, `sdk.export.onnx_split`)
writes to it and the runtime (`sdk.Embedder`) reads and checks it:

* the graph ABI: `INPUT_NAMES` in feed order, `OUTPUT_NAME`, the `present` columns
  (`IMAGE`, `TEXT`, `TRACE`);
* the split layout's graphs: image graph pixels -> `image_graph_outputs(skip_path)`, text graph
  `TEXT_GRAPH_INPUTS` -> `TEXT_GRAPH_OUTPUT`, completion graph `COMPLETION_INPUTS` ->
  `COMPLETION_OUTPUT`;
* the manifest's embedder section, parsed and checked by `read_embedder_spec` into an
  `EmbedderSpec`, and the `fingerprint` of what an embedder computes.

Torch-free and onnxruntime-free: the checks take any object with `get_inputs()`/`get_outputs()`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sdk.errors import EngineError
from sdk.preprocess import ImagePreprocess

__all__ = [
    "COMPLETION_INPUTS", "COMPLETION_OUTPUT", "EMBEDDER_INPUTS", "IMAGE", "INPUT_NAMES", "LAYOUTS", "MODALITIES",
    "OUTPUT_NAME", "SINGLE_PART", "SPLIT_PARTS", "TEXT", "TEXT_GRAPH_INPUTS", "TEXT_GRAPH_OUTPUT", "TOKENIZER_PART",
    "TRACE", "EmbedderSpec", "check_completion_graph", "check_graph", "check_split_graphs", "completion_part",
    "fingerprint", "image_graph_outputs", "read_embedder_spec",
]

# The embedder graph's inputs, in the order the exporter declares them, and its output.
INPUT_NAMES = ("pixels", "input_ids", "attention_mask", "trace_ids", "trace_mask", "present")
OUTPUT_NAME = "embedding"
# The modalities, in the order of the `present` input's columns (as in sdk.train.fusion_model).
MODALITIES = ("image", "text", "trace")
IMAGE, TEXT, TRACE = 0, 1, 2
EMBEDDER_INPUTS = {
    "pixels": {"dtype": "float32", "shape": ["batch", 3, "size", "size"]},
    "input_ids": {"dtype": "int64", "shape": ["batch", "text_len"]},
    "attention_mask": {"dtype": "int64", "shape": ["batch", "text_len"]},
    "trace_ids": {"dtype": "int64", "shape": ["batch", "trace_len"]},
    "trace_mask": {"dtype": "int64", "shape": ["batch", "trace_len"]},
    "present": {"dtype": "float32", "shape": ["batch", 3]},
}

LAYOUTS = ("single", "split")
SINGLE_PART = "embedder.onnx"
SPLIT_PARTS = {"image": "image.onnx", "text": "text.onnx", "head": "head.npz"}
TOKENIZER_PART = "tokenizer.json"
TEXT_GRAPH_INPUTS = ("input_ids", "attention_mask")
TEXT_GRAPH_OUTPUT = "token_states"
COMPLETION_INPUTS = ("attention_mask", "token_states")
COMPLETION_OUTPUT = "image_tokens"


def image_graph_outputs(skip_path: bool) -> list[str]:
    """The outputs a split engine's image graph gives: the image token states, and each photo's
    skip-path term where the model has one (`EmbedderConfig.skip_path`)."""
    return ["image_tokens", "image_skip"] if skip_path else ["image_tokens"]


@dataclass(frozen=True)
class EmbedderSpec:
    """The manifest's embedder section, checked (see `read_embedder_spec`).

    `parts` maps a role to a part name: {"embedder"} for the single layout, {"image", "text",
    "head"} for the split one. The tokenizer parts and budgets are those of `preprocess`.
    """

    layout: str
    parts: Mapping[str, str]
    dim: int
    matryoshka_dims: tuple[int, ...]
    output: str
    precision: str
    image: ImagePreprocess
    text_tokenizer: str
    text_max_length: int
    trace_tokenizer: str
    trace_max_length: int

    @property
    def tokenizer_parts(self) -> list[str]:
        return sorted({self.text_tokenizer, self.trace_tokenizer})


def read_embedder_spec(manifest: Mapping[str, Any], where: str | Path) -> EmbedderSpec:
    """The manifest's embedder contract (written by `sdk.export.bundle`), checked.

    Raises:
        EngineError: naming `where` and what is missing or inconsistent.
    """
    try:
        emb = manifest["embedder"]
        pre = manifest["preprocess"]
        layout = str(emb.get("layout", "single"))
        if layout not in LAYOUTS:
            raise EngineError(f"{where}: unknown embedder layout {layout!r}; install a newer moon3-sdk")
        if layout == "split":
            parts = {k: str(emb["parts"][k]) for k in SPLIT_PARTS}
            inputs = list(INPUT_NAMES)  # the runtime builds the split graphs' feeds itself
        else:
            parts = {"embedder": str(emb["part"])}
            inputs = list(emb["inputs"])
        dim = int(emb["dim"])
        mdims = tuple(int(d) for d in emb["matryoshka_dims"])
        output = str(emb["output"])
        precision = str(emb.get("precision", "fp32"))
        image_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in pre["image"].items()}
        text, trace = pre["text"], pre["trace"]
        text_part, text_len = text["tokenizer"], int(text["max_length"])
        trace_part, trace_len = trace["tokenizer"], int(trace["max_length"])
        if not isinstance(text_part, str) or not isinstance(trace_part, str):
            raise TypeError(f"tokenizer part names must be strings, got {text_part!r}, {trace_part!r}"[:200])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EngineError(
            f"{where}: the manifest has no usable embedder section ({type(exc).__name__}: {exc})"
        ) from exc
    if dim < 1 or not mdims or mdims[-1] != dim or list(mdims) != sorted(set(mdims)) or mdims[0] < 1:
        raise EngineError(f"{where}: inconsistent embedder dims: dim {dim}, matryoshka_dims {list(mdims)}")
    if sorted(inputs) != sorted(INPUT_NAMES):
        raise EngineError(
            f"{where}: the embedder graph takes inputs {inputs}; this sdk feeds {list(INPUT_NAMES)}. "
            "Install the sdk version that built the engine"
        )
    if min(text_len, trace_len) < 2:
        raise EngineError(f"{where}: token budgets must be >= 2, got text {text_len}, trace {trace_len}")
    try:
        image = ImagePreprocess(**image_kw)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"{where}: bad image preprocessing in the manifest: {exc}") from exc
    return EmbedderSpec(layout, parts, dim, mdims, output, precision, image, text_part, text_len, trace_part, trace_len)


def fingerprint(manifest: Mapping[str, Any], spec: EmbedderSpec) -> str:
    """Identity of what the embedder computes: the checksums of the parts it runs, its
    preprocessing, layout, output and width."""
    sha = {p["name"]: p["sha256"] for p in manifest["parts"]}
    used = sorted(set(spec.parts.values()) | set(spec.tokenizer_parts))
    ident = {"parts": {n: sha[n] for n in used}, "preprocess": manifest.get("preprocess"),
             "layout": spec.layout, "output": spec.output, "dim": spec.dim}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def completion_part(section: Any, where: str | Path) -> str:
    """The part name of the manifest's "completion" section (see sdk.export.bundle.completion_parts)."""
    try:
        if section["completes"] != "image":
            raise ValueError(f"it completes {section['completes']!r}; this sdk completes only 'image'")
        return str(section["part"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(
            f"{where}: the manifest's completion section is unusable ({type(exc).__name__}: {exc})"
        ) from exc


def check_graph(session: Any, where: str | Path, output: str, dim: int, size: int) -> None:
    """A single-layout graph takes the ABI inputs and gives `output` of width `dim`."""
    ins = {i.name: i for i in session.get_inputs()}
    if sorted(ins) != sorted(INPUT_NAMES):
        raise EngineError(f"{where}: the embedder graph has inputs {sorted(ins)}, expected {list(INPUT_NAMES)}")
    _check_pixels(ins["pixels"].shape, where, "the graph's", size)
    outs = {o.name: o for o in session.get_outputs()}
    if output not in outs:
        raise EngineError(f"{where}: the embedder graph has no output {output!r} (it has {sorted(outs)})")
    width = outs[output].shape[-1] if outs[output].shape else None
    if isinstance(width, int) and width != dim:
        raise EngineError(f"{where}: the graph's output is {width} wide, the manifest says dim {dim}")


def check_split_graphs(image: Any, text: Any, where: str | Path, size: int, skip_path: bool = False) -> None:
    """The split engine's graphs take and give what `sdk.head.SplitRunner` feeds and reads."""
    for sess, ins, outs, what in ((image, ["pixels"], image_graph_outputs(skip_path), "image"),
                                  (text, list(TEXT_GRAPH_INPUTS), [TEXT_GRAPH_OUTPUT], "text")):
        got_in = sorted(i.name for i in sess.get_inputs())
        got_out = [o.name for o in sess.get_outputs()]
        if got_in != sorted(ins) or any(o not in got_out for o in outs):
            raise EngineError(f"{where}: the {what} graph has inputs {got_in} / outputs {got_out}, "
                              f"expected {ins} / {outs}")
    _check_pixels(image.get_inputs()[0].shape, where, "the image graph's", size)


def check_completion_graph(session: Any, where: str | Path, n_image_tokens: int, width: int,
                           skip_dim: int | None = None) -> None:
    """The completion graph takes title token states and gives (batch, n_image_tokens, width)
    image tokens, what the head reads, and, where it writes the photo's skip term ("image_skip"),
    (batch, skip_dim) for a head with a skip path of that width (`skip_dim`; None: the head has none)."""
    got_in = sorted(i.name for i in session.get_inputs())
    outs = {o.name: o for o in session.get_outputs()}
    if got_in != sorted(COMPLETION_INPUTS) or COMPLETION_OUTPUT not in outs:
        raise EngineError(f"{where}: the completion graph has inputs {got_in} / outputs {sorted(outs)}, expected "
                          f"{sorted(COMPLETION_INPUTS)} / [{COMPLETION_OUTPUT!r}]")
    shape = outs[COMPLETION_OUTPUT].shape
    if len(shape) != 3 or any(isinstance(s, int) and s != w for s, w in zip(shape[1:], (n_image_tokens, width))):
        raise EngineError(f"{where}: the completion graph gives image tokens of shape {shape}; the head reads "
                          f"(batch, {n_image_tokens}, {width})")
    if "image_skip" in outs:
        skip = outs["image_skip"].shape
        if skip_dim is None:
            raise EngineError(f"{where}: the completion graph writes a skip term (image_skip) but the head has no "
                              "skip path; the completion part was trained against another embedder")
        if len(skip) != 2 or (isinstance(skip[1], int) and skip[1] != skip_dim):
            raise EngineError(f"{where}: the completion graph's image_skip has shape {skip}; the head adds "
                              f"(batch, {skip_dim})")


def _check_pixels(shape: Any, where: str | Path, graph: str, size: int) -> None:
    if len(shape) != 4 or any(isinstance(s, int) and s != size for s in shape[2:]):
        raise EngineError(f"{where}: {graph} pixels input is {shape}, the manifest preprocesses to {size}x{size}")
