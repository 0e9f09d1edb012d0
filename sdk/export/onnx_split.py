"""Export the embedder as a split engine: image graph + text graph (ONNX) + NumPy head, then prove it.

    graph = build_reference_graph()
    parts = export_split_onnx(graph, SplitExportConfig("build/split"))
    # -> build/split/image.onnx, text.onnx, head.npz, split.parity.json

    image.onnx   pixels (B, 3, H, W) float32 -> image_tokens (B, N, d)   image tower + image encoder with FIRE
    text.onnx    input_ids, attention_mask (B, T) int64 -> token_states (B, T, C)   titles and traces;
                 a BERT tower with one fused attention and one GELU node per layer (`FusedBertTextGraph`)
    head.npz     `sdk.head.FusionHead` weights: projections, modality fusion, final projection

Why split: the runtime runs each tower only on the items that have that modality (a text query
never runs the image tower), and the head, where a general runtime cannot fuse the small
per-modality ops, runs on the CPU as NumPy + the fused `sdk._C` kernels. The parity check runs
exactly the runtime's code (`sdk.head.SplitRunner`) against the PyTorch `EmbedderGraph` on padded,
mixed-length batches with every modality-absence pattern.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdk.contract import INPUT_NAMES
from sdk.export.onnx_embedder import make_padded_batch
from sdk.export.onnx_tools import ExportError, ParityCheck, check_parity_settings, export_module, ort_session, require

IMAGE_PART, TEXT_PART, HEAD_PART = "image.onnx", "text.onnx", "head.npz"


class ImageGraph(nn.Module):
    """pixels -> image token states: the image tower, then the fusion model's image encoder (FIRE inside)."""

    def __init__(self, image_tower: nn.Module, fusion: nn.Module):
        super().__init__()
        self.image_tower = image_tower
        self.fusion = fusion

    def forward(self, pixels: torch.Tensor):
        deep, shallow = self.image_tower(pixels)  # (B, N, Cd), (B, N, Cs)
        tokens = self.fusion.encode_image(deep, shallow)  # (B, N, d)
        if getattr(self.fusion.cfg, "skip_path", False):  # and the photo's skip-path term (B, out_dim)
            return tokens, self.fusion.skip_image(deep.mean(1))
        return tokens


class TextGraph(nn.Module):
    """Token ids -> token states of the text tower (the last hidden state)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class FusedBertTextGraph(nn.Module):
    """`TextGraph` for a BERT text tower, written for export with ONNX Runtime's fused operators.

    The same weights and arithmetic as the Hugging Face `BertModel` it wraps, but each layer's
    attention core (head split, scaled scores, padding mask, softmax, weighted sum, head merge) is
    one com.microsoft MultiHeadAttention node and each feed-forward activation one com.microsoft
    Gelu node, instead of the exporter's ~25 reshape, transpose, mask, softmax and erf nodes per
    layer. The projections stay MatMuls in their modules' name scopes, so quantization, SmoothQuant
    and the per-module fallbacks see the same matmuls as in the plain graph. Padding keys get the
    operator's mask value (-10000 before the softmax; PyTorch uses the dtype's minimum): both give
    them a weight that is exactly zero in float32. The export's parity check compares this graph
    with the PyTorch tower, as for the plain one.

    Only in an ONNX export: run eagerly, the com.microsoft nodes are placeholders.
    """

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        if not fusable_bert(text_encoder):
            raise ExportError("FusedBertTextGraph needs a BERT encoder with exact GELU and absolute positions")
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from torch.onnx.ops import symbolic

        enc = self.text_encoder
        B, T = input_ids.shape
        heads = enc.config.num_attention_heads
        x = enc.embeddings(input_ids=input_ids)  # (B, T, C); token types 0, positions 0..T-1
        keep = attention_mask.to(torch.int32)  # (B, T): 1 = a real token
        for layer in enc.encoder.layer:
            att = layer.attention
            q, k, v = att.self.query(x), att.self.key(x), att.self.value(x)  # (B, T, C) each
            y = symbolic("com.microsoft::MultiHeadAttention", (q, k, v, None, keep), {"num_heads": heads},
                         dtype=x.dtype, shape=(B, T, x.shape[-1]), version=1)
            x = att.output.LayerNorm(att.output.dense(y) + x)
            h = layer.intermediate.dense(x)  # (B, T, F)
            h = symbolic("com.microsoft::Gelu", (h,), {}, dtype=h.dtype, shape=h.shape, version=1)
            x = layer.output.LayerNorm(layer.output.dense(h) + x)
        return x


def fusable_bert(text_encoder: nn.Module) -> bool:
    """Whether `FusedBertTextGraph` reproduces this text tower: a Hugging Face BERT encoder
    (post-LayerNorm layers, absolute positions, exact erf GELU, no cross-attention)."""
    cfg = getattr(text_encoder, "config", None)
    layers = getattr(getattr(text_encoder, "encoder", None), "layer", None)
    return (cfg is not None and getattr(cfg, "model_type", "") == "bert" and layers is not None
            and getattr(cfg, "hidden_act", None) == "gelu"
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
            and not getattr(cfg, "is_decoder", False) and not getattr(cfg, "add_cross_attention", False)
            and cfg.hidden_size % cfg.num_attention_heads == 0)


@dataclass
class SplitExportConfig:
    """Where and how to export a split embedder.

    Attributes:
        folder: output folder (image.onnx, text.onnx, head.npz, split.parity.json).
        opset: ONNX opset of both graphs.
        image_size: side of the square pixels input.
        check_batches: (batch, text_len, trace_len) of the parity batches.
        min_cosine: per-row cosine gate, split runtime vs PyTorch.
        seed: seed of the example and check batches.
        num_threads: ONNX Runtime intra-op threads for the check (0 = its default).
        fused_text: export a BERT text tower as `FusedBertTextGraph` (ONNX Runtime's fused
            attention and GELU; other towers always export plainly). False: the exporter's own
            decomposition, for runtimes without com.microsoft operators (e.g. TensorRT alone).
    """

    folder: str | Path
    opset: int = 18
    image_size: int = 224
    check_batches: tuple[tuple[int, int, int], ...] = ((1, 5, 3), (5, 11, 2), (2, 3, 16), (7, 16, 6))
    min_cosine: float = 0.9999
    seed: int = 0
    num_threads: int = 0
    fused_text: bool = True

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        check_parity_settings(self.min_cosine, self.check_batches, ("batch", "text_len", "trace_len"))
        if not isinstance(self.fused_text, bool):
            raise ValueError(f"fused_text must be True or False, got {self.fused_text!r}")

    @property
    def parity_path(self) -> Path:
        return self.folder / "split.parity.json"

    def text_graph_kind(self, text_encoder: nn.Module) -> str:
        """"fused" when this text tower exports as `FusedBertTextGraph`, else "plain"."""
        return "fused" if self.fused_text and fusable_bert(text_encoder) else "plain"


def head_state(fusion: nn.Module) -> dict[str, np.ndarray]:
    """The head's weights (the fusion model without its image encoder, and without the fine-tuned
    tower layers, which are in the text and image graphs) as float32 arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in fusion.state_dict().items()
            if not k.startswith(("image.", "text_tail.", "image_tail.", "skip_image."))}


def export_split_onnx(graph: nn.Module, cfg: SplitExportConfig) -> dict[str, Path]:
    """Export an `EmbedderGraph` with a `FusionEmbedder` as image graph + text graph + head weights.

    Returns:
        {"image": path, "text": path, "head": path} of the written parts.

    Raises:
        ExportError: the model is not a fusion embedder, an export failed, or parity is below
            cfg.min_cosine (the report is still written, with "passed": false).
        BackendUnavailableError: onnx or onnxruntime is missing.
    """
    from sdk.contract import image_graph_outputs
    from sdk.head import FusionHead

    require("onnx", "ONNX export needs onnx: pip install 'moon3-sdk[export]'")
    fusion = graph.fusion
    if not hasattr(fusion, "encode_image") or getattr(fusion.cfg, "variant", "") == "linear":
        raise ExportError("a split engine needs a FusionEmbedder (the 'linear' variant exports as one graph)")
    graph.eval()
    cfg.folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": cfg.folder / IMAGE_PART, "text": cfg.folder / TEXT_PART, "head": cfg.folder / HEAD_PART}
    for p in (*paths.values(), cfg.parity_path):
        p.unlink(missing_ok=True)  # nothing stale survives a failed export
    from torch.export import Dim

    batch = Dim("batch", min=1)
    max_len = int(getattr(graph.text_encoder.config, "max_position_embeddings", 0)) or None
    seq = Dim("text_len", min=1, max=max_len)
    ex = make_padded_batch(3, 7, 5, vocab_size=graph.vocab_size, image_size=cfg.image_size, seed=cfg.seed,
                           presence=[(1, 1, 1)] * 3)
    try:
        export_module(ImageGraph(graph.image_tower, fusion).eval(), (torch.from_numpy(ex["pixels"]),),
                      {"pixels": {0: batch}}, image_graph_outputs(getattr(fusion.cfg, "skip_path", False)), paths["image"],
                      cfg.opset)
        fused = cfg.text_graph_kind(graph.text_encoder) == "fused"
        text_graph = FusedBertTextGraph(graph.text_encoder) if fused else TextGraph(graph.text_encoder)
        export_module(text_graph.eval(),
                      (torch.from_numpy(ex["input_ids"]), torch.from_numpy(ex["attention_mask"])),
                      {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                      ["token_states"], paths["text"], cfg.opset)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter crash becomes an ExportError naming it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"split export failed: {type(exc).__name__}: {first}") from exc
    head = FusionHead(head_state(fusion), json.loads(fusion.cfg.to_json()))
    paths["head"].write_bytes(head.to_bytes())
    report = verify_split(graph, paths, cfg)
    cfg.parity_path.write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise ExportError(report["failure"], report)
    return paths


def split_runner(paths: dict[str, Path], num_threads: int = 0):
    """A `sdk.head.SplitRunner` over exported parts (CPU)."""
    from sdk.head import FusionHead, SplitRunner

    return SplitRunner(ort_session(Path(paths["image"]), num_threads), ort_session(Path(paths["text"]), num_threads),
                       FusionHead.from_bytes(Path(paths["head"]).read_bytes(), str(paths["head"])))


def verify_split(graph: nn.Module, paths: dict[str, Path], cfg: SplitExportConfig) -> dict[str, Any]:
    """Row cosine of the split runtime vs the PyTorch graph on cfg.check_batches (a report dict)."""
    runner = split_runner(paths, cfg.num_threads)
    check = ParityCheck("split", cfg.min_cosine, cfg.opset, mean=True)
    for k, (b, t, s) in enumerate(cfg.check_batches):
        feed = make_padded_batch(b, t, s, vocab_size=graph.vocab_size, image_size=cfg.image_size, seed=cfg.seed + 1 + k)
        got = runner(feed)
        with torch.inference_mode():
            want = graph(*(torch.from_numpy(feed[n]) for n in INPUT_NAMES)).float().numpy()
        check.add(got, want, {"batch": b, "text_len": t, "trace_len": s},
                  f"check batch {k} (batch={b}, text_len={t}, trace_len={s})")
    return check.report(text_graph=cfg.text_graph_kind(graph.text_encoder))
