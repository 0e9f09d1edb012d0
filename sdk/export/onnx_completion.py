"""Export the image completion module (`sdk.train.completion.ImageCompletion`) as an ONNX part, then prove it.

    path = export_completion_onnx(model, CompletionExportConfig("build/completion"))
    # -> build/completion/completion.onnx, completion.parity.json

    completion.onnx   token_states (B, T, C) float32, attention_mask (B, T) int64
                      -> image_tokens (B, N, d) float32
                         [, image_skip (B, out_dim) float32: the photo's skip term, for an
                          embedder with a skip path (`CompletionConfig.skip_dim`)]

The runtime (`sdk.head.SplitRunner` with `complete_image=True`) feeds it the text graph's title
token states of the items that have a title but no photo, and hands the completed image tokens
to the fusion head with the image marked present. The parity check runs the exported graph with
ONNX Runtime against the PyTorch module on padded, mixed-length batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdk.export.onnx_tools import ExportError, ParityCheck, check_parity_settings, export_module, ort_session, require

COMPLETION_PART = "completion.onnx"
COMPLETION_INPUTS = ("token_states", "attention_mask")
COMPLETION_OUTPUT = "image_tokens"
COMPLETION_SKIP = "image_skip"


def completion_outputs(model: nn.Module) -> list[str]:
    """The completion graph's outputs: the image tokens, and the skip term where the module writes one."""
    return [COMPLETION_OUTPUT] + ([COMPLETION_SKIP] if getattr(model.cfg, "skip_dim", 0) else [])


class CompletionGraph(nn.Module):
    """The ONNX contract around `ImageCompletion`: an int64 mask, as the text graph takes."""

    def __init__(self, completion: nn.Module):
        super().__init__()
        self.completion = completion

    def forward(self, token_states: torch.Tensor, attention_mask: torch.Tensor):
        tokens, skip = self.completion.complete(token_states, attention_mask.to(token_states.dtype))
        return tokens if skip is None else (tokens, skip)  # (B, N, d)[, (B, out_dim)]


@dataclass
class CompletionExportConfig:
    """Where and how to export the completion module.

    Attributes:
        folder: output folder (completion.onnx, completion.parity.json).
        opset: ONNX opset.
        check_batches: (batch, text_len) of the padded parity batches.
        min_cosine: gate on the per-row cosine of the flattened image tokens, ONNX vs PyTorch.
        seed: seed of the check batches.
        num_threads: ONNX Runtime intra-op threads for the check (0 = its default).
    """

    folder: str | Path
    opset: int = 18
    check_batches: tuple[tuple[int, int], ...] = ((1, 4), (5, 11), (3, 32))
    min_cosine: float = 0.9999
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        check_parity_settings(self.min_cosine, self.check_batches, ("batch", "text_len"))

    @property
    def path(self) -> Path:
        return self.folder / COMPLETION_PART

    @property
    def parity_path(self) -> Path:
        return self.folder / "completion.parity.json"


def padded_states(batch: int, length: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Random token states (B, T, C) and a right-padded int64 mask (B, T) whose rows have 1..T real
    tokens (the first row full), with zeros on the padding, as the runtime passes them."""
    rng = np.random.default_rng(seed)
    states = rng.standard_normal((batch, length, dim)).astype(np.float32)
    lengths = np.concatenate([[length], rng.integers(1, length + 1, size=batch - 1)])
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)  # (B, T)
    states *= mask[..., None]
    return {"token_states": states, "attention_mask": mask}


def export_completion_onnx(model: nn.Module, cfg: CompletionExportConfig) -> Path:
    """Export an `ImageCompletion` to cfg.path and check it against PyTorch.

    Returns:
        The path of completion.onnx.

    Raises:
        ExportError: the export failed or parity is below cfg.min_cosine (the report is still
            written, with "passed": false).
        BackendUnavailableError: onnx or onnxruntime is missing.
    """
    require("onnx", "ONNX export needs onnx: pip install 'moon3-sdk[export]'")
    from torch.export import Dim

    graph = CompletionGraph(model).eval()
    cfg.folder.mkdir(parents=True, exist_ok=True)
    for p in (cfg.path, cfg.parity_path):
        p.unlink(missing_ok=True)  # nothing stale survives a failed export
    dim = int(model.cfg.text_dim)
    ex = padded_states(3, 7, dim, cfg.seed)
    batch, seq = Dim("batch", min=1), Dim("text_len", min=1)
    try:
        export_module(graph, (torch.from_numpy(ex["token_states"]), torch.from_numpy(ex["attention_mask"])),
                      {"token_states": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                      completion_outputs(model), cfg.path, cfg.opset)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter crash becomes an ExportError naming it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"completion export failed: {type(exc).__name__}: {first}") from exc
    report = verify_completion(graph, cfg)
    cfg.parity_path.write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise ExportError(report["failure"], report)
    return cfg.path


def verify_completion(graph: nn.Module, cfg: CompletionExportConfig) -> dict[str, Any]:
    """Per-row cosine and max abs error of the ONNX graph vs PyTorch on cfg.check_batches (a report)."""
    sess = ort_session(cfg.path, cfg.num_threads)
    dim = int(graph.completion.cfg.text_dim)
    check = ParityCheck("completion", cfg.min_cosine, cfg.opset)
    names = completion_outputs(graph.completion)
    for k, (b, t) in enumerate(cfg.check_batches):
        feed = padded_states(b, t, dim, cfg.seed + 1 + k)
        got = sess.run(names, feed)
        with torch.inference_mode():
            want = graph(*(torch.from_numpy(feed[n]) for n in COMPLETION_INPUTS))
        want = [w.float().numpy() for w in (want if isinstance(want, tuple) else (want,))]
        for name, g, w in zip(names, got, want):  # each output's rows, tokens then skip term
            check.add(g.reshape(b, -1), w.reshape(b, -1), {"batch": b, "text_len": t, "output": name},
                      f"check batch {k} (batch={b}, text_len={t}), {name}")
    return check.report()
