"""Export the product reasoner to the ONNX graphs the runtime generates with, then prove them.

    visual.onnx   pixels (B, 3, H, W) -> visual_k, visual_v (L, B, h, n, c)
                  [, attributes (B, C): the attribute heads' softmaxes, when given heads]
                  image tower + resampler + every layer's PUMGPT adapter, run once per photo
    step.onnx     input_ids (B, T), visual_k, visual_v, visual_mask (B,), past_k_0..past_k_{L-1},
                  past_v_0..past_v_{L-1} (B, h, P, c) -> logits (B, V) of the last position,
                  present_k_0.., present_v_0.. (B, h, P + T, c)

One step graph serves both phases: the prompt is read with a cache of length P = 0 (prefill),
then each new token with T = 1 (decode), so the decoder weights are stored once. The cache is one
input and one output per layer, fed straight to and taken straight from each layer's attention: a
cache stacked over layers cost two extra copies of it per token (slicing it per layer, stacking it
back). Engines from before hold such a stacked cache (past_k, past_v (L, B, h, P, c)), and the
oldest a prefill graph without past inputs beside the decode graph; the runtime reads all three.
An item without a photo feeds zeros as visual_k / visual_v and visual_mask 0 (the adapters then add
nothing). Parity: greedy generation with ONNX Runtime (`sdk.reasoner.OnnxDecoder`, the runtime's
own loop) must give exactly the tokens of `Reasoner.generate` in PyTorch, and the logits of every
generated position must match to `max_abs_err`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdk.export.onnx_tools import ExportError, export_module, ort_session

VISUAL_PART, STEP_PART = "reasoner_visual.onnx", "reasoner_step.onnx"


class VisualGraph(nn.Module):
    """The photo's adapter keys/values and, with `heads` (`sdk.train.attribute_heads`), the attribute
    heads' softmaxes over the same tower's mean-pooled map: one tower pass serves both."""

    def __init__(self, image_tower: nn.Module, reasoner: nn.Module, heads: nn.Module | None = None):
        super().__init__()
        self.image_tower = image_tower
        self.reasoner = reasoner
        self.heads = heads

    def forward(self, pixels):
        deep, _ = self.image_tower(pixels)  # (B, 49, 1280)
        kv = self.reasoner.visual(deep)
        out = torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])  # (L, B, h, n, c) each
        return out if self.heads is None else (*out, self.heads(deep.mean(1)))


class StepGraph(nn.Module):
    """Logits of the last new position and the grown cache; P = 0 reads a whole prompt.

    The decoder layers of `sdk.train.reasoner_model.Reasoner`, written for export with ONNX Runtime's
    fused attention (com.microsoft MultiHeadAttention): one node per attention instead of the
    exporter's reshapes, transposes, mask and concat ops; causal (`unidirectional`) over the cache
    it appends to, and a second one over the layer's visual keys/values (a separate softmax, as in
    training). The LM head runs on the last position only. `verify_reasoner` checks that greedy
    generation through this graph gives exactly the PyTorch model's tokens.
    """

    def __init__(self, reasoner: nn.Module):
        super().__init__()
        self.reasoner = reasoner

    def forward(self, input_ids, visual_k, visual_v, visual_mask, past):
        # past: [past_k_0, .., past_k_{L-1}, past_v_0, .., past_v_{L-1}], each (B, h, P, c)
        from torch.onnx.ops import symbolic, symbolic_multi_out

        r = self.reasoner
        L = len(r.layers)
        B, T = input_ids.shape
        P = past[0].shape[2]
        d, H = r.cfg.d_model, r.cfg.n_heads
        x = r.embed(input_ids) + r.pos(torch.arange(P, P + T))  # (B, T, d)
        keys, values = [], []
        for n, layer in enumerate(r.layers):
            q, k, v = layer.qkv(layer.norm1(x)).chunk(3, dim=-1)  # (B, T, d) each
            y, pk, pv = symbolic_multi_out(
                "com.microsoft::MultiHeadAttention", (q, k, v, None, None, None, past[n], past[L + n]),
                {"num_heads": H, "unidirectional": 1}, dtypes=(torch.float32,) * 3,
                shapes=((B, T, d), (B, H, P + T, d // H), (B, H, P + T, d // H)), version=1)
            yv = symbolic("com.microsoft::MultiHeadAttention", (q, visual_k[n], visual_v[n]), {"num_heads": H},
                          dtype=torch.float32, shape=(B, T, d), version=1)  # keys/values (B, h, n, c)
            y = y + torch.tanh(layer.gate) * visual_mask.view(B, 1, 1).to(y.dtype) * yv
            x = x + layer.o(y)
            x = x + layer.ffn(layer.norm2(x))
            keys.append(pk)
            values.append(pv)
        logits = r.norm(x[:, -1]) @ r.embed.weight.T  # tied head, (B, V)
        return (logits, *keys, *values)


def cache_names(n_layers: int, prefix: str = "past") -> list[str]:
    """The step graph's cache inputs ("past") or outputs ("present"): every layer's keys, then values."""
    return [f"{prefix}_{kv}_{i}" for kv in ("k", "v") for i in range(n_layers)]


@dataclass
class ReasonerExportConfig:
    folder: str | Path
    opset: int = 18
    image_size: int = 224
    max_abs_err: float = 1e-3  # logits, ONNX Runtime vs PyTorch
    check_new_tokens: int = 24
    num_threads: int = 0

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)


def export_reasoner_onnx(image_tower: nn.Module, reasoner: nn.Module, cfg: ReasonerExportConfig,
                         check_prompts: list[list[int]] | None = None, heads: nn.Module | None = None
                         ) -> dict[str, Path]:
    """Write the visual and step graphs into cfg.folder and check them against PyTorch; with
    `heads` (`sdk.train.attribute_heads.load_heads_module`) the visual graph also outputs their
    softmaxes ("attributes"), checked against PyTorch too.

    Returns:
        {"visual": path, "prefill": path, "decode": path} (prefill and decode: the one step
        graph); `reasoner.parity.json` is written beside.

    Raises:
        ExportError: an export failed, logits differ by more than cfg.max_abs_err, or greedy
            generation gives other tokens (the report is written, with "passed": false).
    """
    from torch.export import Dim

    reasoner.eval()
    image_tower.eval()
    cfg.folder.mkdir(parents=True, exist_ok=True)
    paths = {"visual": cfg.folder / VISUAL_PART, "prefill": cfg.folder / STEP_PART, "decode": cfg.folder / STEP_PART}
    rcfg = reasoner.cfg
    L, h, c, n = rcfg.n_layers, rcfg.n_heads, rcfg.d_model // rcfg.n_heads, rcfg.n_visual
    g = torch.Generator().manual_seed(0)
    B, T, P = 2, 5, 3
    pixels = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    vk, vv = torch.randn(L, B, h, n, c, generator=g), torch.randn(L, B, h, n, c, generator=g)
    ids = torch.randint(6, rcfg.vocab_size, (B, T), generator=g)
    vmask = torch.tensor([1.0, 0.0])
    past = [torch.randn(B, h, P, c, generator=g) for _ in range(2 * L)]
    batch = Dim("batch", min=1)
    seq = Dim("seq", min=1, max=rcfg.max_len)
    cached = Dim("past", min=1, max=rcfg.max_len - 1)
    vis = {0: Dim.STATIC, 1: batch}  # layers: fixed
    jobs = (
        (VisualGraph(image_tower, reasoner, heads), (pixels,), {"pixels": {0: batch}},
         ["visual_k", "visual_v", *(["attributes"] if heads is not None else [])], "visual", None),
        # traced with a cache of P >= 1 positions; the graph is shape-generic and runs with P = 0
        # (verify_reasoner checks generation through it against PyTorch)
        (StepGraph(reasoner), (ids, vk, vv, vmask, past),
         {"input_ids": {0: batch, 1: seq}, "visual_k": vis, "visual_v": vis, "visual_mask": {0: batch},
          "past": [{0: batch, 2: cached}] * (2 * L)},
         ["logits", *cache_names(L, "present")], "decode",
         ["input_ids", "visual_k", "visual_v", "visual_mask", *cache_names(L)]),
    )
    for module, args, dyn, outs, key, ins in jobs:
        try:
            export_module(module.eval(), args, dyn, outs, paths[key], cfg.opset, inputs=ins)
        except Exception as exc:  # noqa: BLE001 - an exporter crash becomes an ExportError naming it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportError(f"reasoner {key} export failed: {type(exc).__name__}: {first}") from exc
    report = verify_reasoner(image_tower, reasoner, paths, cfg, check_prompts, heads)
    (cfg.folder / "reasoner.parity.json").write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise ExportError(report["failure"], report)
    return paths


def verify_reasoner(image_tower, reasoner, paths, cfg: ReasonerExportConfig, prompts=None, heads=None) -> dict[str, Any]:
    from sdk.reasoner import OnnxDecoder

    step = ort_session(paths["decode"], cfg.num_threads)
    prefill = step if paths["prefill"] == paths["decode"] else ort_session(paths["prefill"], cfg.num_threads)
    dec = OnnxDecoder(ort_session(paths["visual"], cfg.num_threads), prefill, step)
    rcfg = reasoner.cfg
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    prompts = prompts or [[1, *torch.randint(6, rcfg.vocab_size, (k,), generator=g).tolist(), 3] for k in (4, 9)]
    worst, mismatches, rows = 0.0, [], 0
    with torch.inference_mode():
        deep = image_tower(pixels)[0]
    vk, vv = dec.visual(pixels.numpy())
    for i, prompt in enumerate(prompts):
        for photo in (True, False):
            d = deep[i % 2] if photo else None
            want = reasoner.generate(prompt, d, max_new_tokens=cfg.check_new_tokens)
            got, logits = dec.generate(prompt, (vk[:, i % 2 : i % 2 + 1], vv[:, i % 2 : i % 2 + 1]) if photo else None,
                                       cfg.check_new_tokens, return_logits=True)
            with torch.inference_mode():
                ref, _ = reasoner(torch.tensor([prompt + got[:-1]]) if got else torch.tensor([prompt]),
                                  d[None] if photo else None, torch.ones(1) if photo else None)
            ref = ref[0, len(prompt) - 1 :].numpy()  # logits at every generated position
            err = float(np.abs(np.stack(logits)[: len(ref)] - ref[: len(logits)]).max()) if logits else 0.0
            worst = max(worst, err)
            rows += 1
            if got != want:
                mismatches.append({"prompt": i, "photo": photo, "onnx": got, "torch": want})
    failure = None
    if mismatches:
        failure = f"reasoner ONNX greedy tokens differ from PyTorch in {len(mismatches)} of {rows} generations"
    elif not worst <= cfg.max_abs_err:
        failure = f"reasoner ONNX logits differ from PyTorch by {worst:.3g} > {cfg.max_abs_err}"
    report = {"generations": rows, "max_abs_err_logits": worst, "mismatches": mismatches[:3]}
    if heads is not None:
        with torch.inference_mode():
            want = heads(deep.mean(1)).numpy()
        got = dec.visual_session.run(["attributes"], {"pixels": pixels.numpy()})[0]
        report["max_abs_err_attributes"] = err = float(np.abs(got - want).max())
        if failure is None and not err <= cfg.max_abs_err:
            failure = f"the attribute heads' ONNX softmaxes differ from PyTorch by {err:.3g} > {cfg.max_abs_err}"
    report["passed"] = failure is None
    if failure:
        report["failure"] = failure
    return report
