"""The embedder head: tower token states -> L2-normalised embeddings, in one compiled call.

A split engine (see `sdk.export.bundle.package_split_embedder`) runs the image graph
(EfficientNet-Lite0 + image encoder with FIRE -> image token states) and the text graph (MiniLM
token states, for titles and traces) in ONNX Runtime, each only on the items that have that
modality, and this head on the CPU:

    text/trace projection (Linear + LayerNorm)
    query start = learned query + mean of the present modalities' pooled tokens
    n rounds of modality fusion: per-modality cross-attention of the query -> gate logits ->
        `fusion_epilogue` (gate softmax, weighted sum, output projection, residual, LayerNorm)
        -> FFN residual
    `project_normalize` (LayerNorm, projection, Matryoshka truncation, L2 norm)

It computes what `sdk.train.fusion_model.FusionEmbedder.forward` computes (given the image token
states), in float32; the export check holds the two to cosine >= 0.9999. An absent modality's
states are never read into the result: its gate weight is exactly 0 and the query start skips it,
so callers pass zeros for them without running a tower. This module never imports torch.

Where `sdk._C` is built, the whole head runs in `sdk._C.FusionHeadKernel` (csrc/head.cpp: one
call, weights packed when the engine loads, the GIL released); `FusionHead.forward_reference` is
the NumPy version (calling the per-op fused kernels where they exist) and the fallback.
"""

from __future__ import annotations

import io
import json
import math
import os
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from sdk import ops
from sdk.contract import image_graph_outputs
from sdk.errors import EngineError
from sdk.fused import NEG, fusion_epilogue, gelu, layer_norm, linear, project_normalize

_F32 = np.float32
HEAD_FORMAT = 1


@lru_cache(maxsize=32)
def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A read-only float32 zero array, shared: a modality no row of a batch has costs no allocation."""
    z = np.zeros(shape, _F32)
    z.flags.writeable = False
    return z


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # x: (B, T, C), mask: (B, T) -> (B, C); an all-zero mask gives zeros
    s = np.einsum("btc,bt->bc", x, mask).astype(_F32)
    return s / np.maximum(mask.sum(1, keepdims=True), _F32(1.0))


def head_weight_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight the head reads, for an `EmbedderConfig` dict."""
    d, c, out = int(config["d_model"]), int(config["text_dim"]), int(config["out_dim"])
    need: dict[str, tuple[int, ...]] = {"query": (1, 1, d), "head.0.weight": (d,), "head.0.bias": (d,),
                                        "head.1.weight": (out, d), "head.1.bias": (out,)}
    for p in ("text_proj", "trace_proj"):
        need |= {f"{p}.0.weight": (d, c), f"{p}.0.bias": (d,), f"{p}.1.weight": (d,), f"{p}.1.bias": (d,)}
    for k in range(int(config["n_fusion_layers"])):
        f = f"fusion.{k}."
        need |= {f + "q_norm.weight": (d,), f + "q_norm.bias": (d,), f + "gate.0.weight": (d, 2 * d),
                 f + "gate.0.bias": (d,), f + "gate.2.weight": (1, d), f + "gate.2.bias": (1,),
                 f + "out.weight": (d, d), f + "out.bias": (d,), f + "ffn.0.weight": (d,), f + "ffn.0.bias": (d,)}
        mult = int(config.get("ffn_mult", 4))
        need |= {f + "ffn.1.weight": (mult * d, d), f + "ffn.1.bias": (mult * d,),
                 f + "ffn.4.weight": (d, mult * d), f + "ffn.4.bias": (d,)}
        for m in range(3):
            need |= {f"{f}kv_norms.{m}.weight": (d,), f"{f}kv_norms.{m}.bias": (d,),
                     f"{f}attn.{m}.q.weight": (d, d), f"{f}attn.{m}.q.bias": (d,),
                     f"{f}attn.{m}.kv.weight": (2 * d, d), f"{f}attn.{m}.kv.bias": (2 * d,),
                     f"{f}attn.{m}.o.weight": (d, d), f"{f}attn.{m}.o.bias": (d,)}
    if config.get("skip_path"):  # the title's side of the skip path (the photo's is in the image graph)
        need |= {"skip_text.mean": (c,), "skip_text.inv_std": (c,), "skip_text.proj.weight": (out, c),
                 "skip_text.proj.bias": (out,)}
    return need


def _config_weight(config: Mapping[str, Any], key: str, default: float, zero: bool = True,
                   nullable: bool = False) -> float:
    """A weight of the head config (`default` where absent, or None and `nullable`): finite and
    >= 0 (> 0 unless `zero`).

    Raises:
        EngineError: it is not a number, or out of that range.
    """
    value = config.get(key, default)
    try:
        w = default if value is None and nullable else float(value)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"the head config's {key} is not a number: {exc}") from exc
    if not (np.isfinite(w) and (w >= 0 if zero else w > 0)):
        raise EngineError(f"the head config's {key} must be finite and {'>=' if zero else '>'} 0, got {w}")
    return w


def _f32(a) -> np.ndarray:
    """`a` as the C-contiguous float32 array the compiled head reads (no copy when it already is)."""
    return np.ascontiguousarray(a, _F32)


class FusionHead:
    """NumPy inference of the fusion embedder's head.

    Args:
        state: float32 arrays keyed by `FusionEmbedder.state_dict()` names (the image encoder's
            "image.*" entries are not needed).
        config: the `EmbedderConfig` fields as a dict (d_model, n_heads, n_fusion_layers, out_dim...).

    Raises:
        EngineError: a weight is missing or has the wrong shape, or a config value is not valid.
    """

    def __init__(self, state: Mapping[str, np.ndarray], config: Mapping[str, Any]):
        try:
            self.d = int(config["d_model"])
            self.h = int(config["n_heads"])
            self.n_layers = int(config["n_fusion_layers"])
            self.out_dim = int(config["out_dim"])
            self.text_dim = int(config["text_dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"the head config lacks a field: {exc}") from exc
        self.config = dict(config)
        # the skip path: the image graph gives each photo's term ("image_skip", B x out_dim) and the
        # head adds it and the title's own (a linear map of its mean token state) before the norm
        self.skip_path = bool(config.get("skip_path", False))
        # the title's skip term's weight in photo + title vectors (EmbedderConfig.title_weight_with_photo)
        self.title_weight_with_photo = _config_weight(config, "title_weight_with_photo", 1.0, zero=False)
        # photo + title vectors blend in their photo-only and title-only ones (EmbedderConfig.modality_blend),
        # the title-only one by its own weight where given (EmbedderConfig.title_blend; None: modality_blend)
        self.modality_blend = _config_weight(config, "modality_blend", 0.0)
        self.title_blend = _config_weight(config, "title_blend", self.modality_blend, nullable=True)
        self._w: dict[str, np.ndarray] = {}
        need = head_weight_shapes(config)
        for name, shape in need.items():
            if name not in state:
                raise EngineError(f"the head weights lack {name!r}")
            arr = np.ascontiguousarray(state[name], _F32)
            if arr.shape != shape:
                raise EngineError(f"head weight {name!r} has shape {arr.shape}, expected {shape}")
            self._w[name] = arr
        self._kernel = None
        if ops.HAVE_C and hasattr(ops._C, "FusionHeadKernel"):
            try:
                self._kernel = ops._C.FusionHeadKernel(self._w, self.d, self.h, self.n_layers, self.out_dim,
                                                       self.text_dim, int(config.get("ffn_mult", 4)))
            except ValueError as exc:
                raise EngineError(f"the head config is inconsistent: {exc}") from exc
        # False: run `forward_reference` (NumPy + the per-op kernels); MOON3_FUSED_HEAD=0 sets it off
        self.fused = self._kernel is not None and os.environ.get("MOON3_FUSED_HEAD", "1") != "0"

    # ------------------------------------------------------------------ serialisation

    def to_bytes(self) -> bytes:
        """`.npz` bytes of the weights plus the config (no pickle)."""
        buf = io.BytesIO()
        meta = np.frombuffer(json.dumps({"format": HEAD_FORMAT, "config": self.config}).encode(), np.uint8)
        np.savez(buf, __meta__=meta, **self._w)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, where: str = "head") -> "FusionHead":
        """Load what `to_bytes` wrote; object arrays (pickle) are refused."""
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - zipfile/numpy/json raise many types
            raise EngineError(f"{where}: the head weights cannot be read ({type(exc).__name__}: {exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT or not isinstance(meta.get("config"), dict):
            raise EngineError(f"{where}: unknown head weights format "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
        return cls(arrays, meta["config"])

    # ------------------------------------------------------------------ inference

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return linear(x, self._w[name + ".weight"], self._w[name + ".bias"])

    def _ln(self, x: np.ndarray, name: str) -> np.ndarray:
        return layer_norm(x, self._w[name + ".weight"], self._w[name + ".bias"])

    def _attend(self, qn: np.ndarray, kv: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
        # qn: (B, d) one query per row; kv: (B, T, d) normed context; mask: (B, T) -> (B, d)
        B, T, d = kv.shape
        h, c = self.h, d // self.h
        q = self._linear(qn, name + ".q").reshape(B, h, c)  # (B, h, c)
        kvp = self._linear(kv, name + ".kv").reshape(B, T, 2, h, c)
        k, v = kvp[:, :, 0], kvp[:, :, 1]  # (B, T, h, c)
        att = np.einsum("bhc,bthc->bht", q, k) * _F32(1.0 / math.sqrt(c))  # (B, h, T)
        att = att + ((_F32(1.0) - mask) * _F32(NEG))[:, None, :]
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = np.einsum("bht,bthc->bhc", att, v).reshape(B, d)  # (B, d)
        return self._linear(y, name + ".o")

    def __call__(
        self,
        image_tokens: np.ndarray,
        text_states: np.ndarray,
        text_mask: np.ndarray,
        trace_states: np.ndarray,
        trace_mask: np.ndarray,
        present: np.ndarray,
        dim: int | None = None,
        image_skip: np.ndarray | None = None,
    ) -> np.ndarray:
        """Embeddings (B, dim) float32, L2-normalised; dim defaults to the full width.

        Runs the whole head in one compiled call (`sdk._C.FusionHeadKernel`) when the extension
        is built, `fused` is True and `sdk.ops.HAVE_C` holds; otherwise `forward_reference`.
        Both take the arguments documented there and agree to cosine >= 0.99999. With
        `modality_blend` B, a row with a photo and a title is normalise(fused + B * (photo-only +
        title-only)), the three the head's full-width unit vectors, then cut to `dim`; with
        `title_blend` T the title-only vector weighs T instead.
        """
        present = np.asarray(present, _F32)
        blends = self.modality_blend or self.title_blend
        both = np.flatnonzero((present[:, 0] > 0) & (present[:, 1] > 0)) if blends else ()
        if not len(both):
            return self._embed(image_tokens, text_states, text_mask, trace_states, trace_mask, present, dim, image_skip)
        views = []
        for m in (0, 1):  # the same rows with the photo alone, then the title alone
            alone = np.zeros((len(both), 3), _F32)
            alone[:, m] = 1.0
            views.append(alone)
        if self.fused and ops.HAVE_C and self._kernel is not None:
            e, *parts = self._embed_views(image_tokens, text_states, text_mask, trace_states, trace_mask, present,
                                          image_skip, both, views)
        else:
            e = self._embed(image_tokens, text_states, text_mask, trace_states, trace_mask, present, None, image_skip)
            parts = [self._embed(image_tokens[both], text_states[both], text_mask[both] * alone[:, 1:2],
                                 trace_states[both], np.zeros_like(trace_mask[both], _F32), alone, None,
                                 None if image_skip is None else image_skip[both]) for alone in views]
        e[both] = ops.l2_normalize_ref(e[both] + _F32(self.modality_blend) * parts[0] + _F32(self.title_blend) * parts[1])
        return e if dim is None or int(dim) == self.out_dim else ops.l2_normalize_ref(e[:, : int(dim)])

    def _embed(self, image_tokens, text_states, text_mask, trace_states, trace_mask, present, dim, image_skip):
        """`__call__` without the blend: the head's own vectors of these rows."""
        skip = self.skip_term(image_skip, text_states, text_mask, present) if self.skip_path else None
        if self.fused and ops.HAVE_C and self._kernel is not None:
            return self._kernel(*map(_f32, (image_tokens, text_states, text_mask, trace_states, trace_mask, present)),
                                self.out_dim if dim is None else int(dim), skip)
        return self.forward_reference(image_tokens, text_states, text_mask, trace_states, trace_mask, present, dim,
                                      skip=skip)

    def _embed_views(self, image_tokens, text_states, text_mask, trace_states, trace_mask, present, image_skip,
                     rows: np.ndarray, views: list[np.ndarray]) -> list[np.ndarray]:
        """Full-width vectors of every row under `present`, then of `rows` under each view's
        present mask, in one kernel call: the view rows read the same token rows (`source`), so each
        row's K/V projections are computed once for all of its views."""
        B = present.shape[0]
        pres = np.concatenate([present, *views]).astype(_F32)
        source = np.concatenate([np.arange(B, dtype=np.int64), *[rows.astype(np.int64) for _ in views]])
        skip = None
        if self.skip_path:
            skip = np.concatenate([self.skip_term(image_skip, text_states, text_mask, present)] + [
                self.skip_term(None if image_skip is None else image_skip[rows], text_states[rows], text_mask[rows], v)
                for v in views])
        out = self._kernel(*map(_f32, (image_tokens, text_states, text_mask, trace_states, trace_mask, pres)),
                           self.out_dim, skip, source=source)
        bounds = np.cumsum([B] + [len(rows)] * len(views))[:-1]
        return np.split(out, bounds)

    def skip_term(self, image_skip: np.ndarray | None, text_states: np.ndarray, text_mask: np.ndarray,
                  present: np.ndarray) -> np.ndarray:
        """The skip path's term (B, out_dim): the photo's (`image_skip`, from the image graph; None:
        no photo term, as for completed image tokens) where a photo is present, plus the linear
        map of the standardised mean title state where a title is (weighing `title_weight_with_photo`
        where a photo is too)."""
        present = np.asarray(present, _F32)
        txt = _masked_mean(np.asarray(text_states, _F32), np.asarray(text_mask, _F32))  # (B, C)
        w = self._w
        title = present[:, 1:2] * (1.0 + (self.title_weight_with_photo - 1.0) * present[:, :1])
        out = self._linear((txt - w["skip_text.mean"]) * w["skip_text.inv_std"], "skip_text.proj") * title
        if image_skip is not None:
            image_skip = np.asarray(image_skip, _F32)
            if image_skip.shape != (present.shape[0], self.out_dim):
                raise EngineError(f"image_skip has shape {image_skip.shape}, expected ({present.shape[0]}, {self.out_dim})")
            out = out + image_skip * present[:, :1]
        return np.ascontiguousarray(out, _F32)

    def forward_reference(
        self,
        image_tokens: np.ndarray,  # (B, N, d) image token states (zeros where absent)
        text_states: np.ndarray,  # (B, T, text_dim) title token states
        text_mask: np.ndarray,  # (B, T) 1 on real tokens, 0 on padding and where the text is absent
        trace_states: np.ndarray,  # (B, S, text_dim)
        trace_mask: np.ndarray,  # (B, S)
        present: np.ndarray,  # (B, 3) 0/1: image, text, trace
        dim: int | None = None,
        skip: np.ndarray | None = None,  # (B, out_dim) `skip_term`, added before the truncation and norm
    ) -> np.ndarray:
        """The head in NumPy plus the per-op fused kernels: the reference of the one-call kernel."""
        present = np.asarray(present, _F32)
        B = present.shape[0]
        img_mask = np.broadcast_to(present[:, :1], image_tokens.shape[:2]).astype(_F32)
        tokens = [
            np.asarray(image_tokens, _F32),
            self._ln(self._linear(np.asarray(text_states, _F32), "text_proj.0"), "text_proj.1"),
            self._ln(self._linear(np.asarray(trace_states, _F32), "trace_proj.0"), "trace_proj.1"),
        ]
        masks = [img_mask, np.asarray(text_mask, _F32), np.asarray(trace_mask, _F32)]
        pooled = np.stack([_masked_mean(t, m) for t, m in zip(tokens, masks)], 1)  # (B, 3, d)
        start = np.einsum("bmd,bm->bd", pooled, present) / np.maximum(present.sum(1, keepdims=True), _F32(1.0))
        q = (self._w["query"].reshape(1, -1) + start).astype(_F32)  # (B, d)
        has = [present[:, m] > 0 for m in range(3)]
        for k in range(self.n_layers):
            f = f"fusion.{k}."
            qn = self._ln(q, f + "q_norm")  # (B, d)
            outs = np.zeros((B, 3, self.d), _F32)
            logits = np.zeros((B, 3), _F32)
            for m, (tok, mask) in enumerate(zip(tokens, masks)):
                # only the rows that have modality m: an absent one gets gate weight 0 anyway
                rows = slice(None) if has[m].all() else np.flatnonzero(has[m])
                if not has[m].any():
                    continue
                kv = self._ln(tok[rows], f"{f}kv_norms.{m}")  # (b, T_m, d)
                outs[rows, m] = self._attend(qn[rows], kv, mask[rows], f"{f}attn.{m}")
                gin = np.concatenate([qn[rows], _masked_mean(kv, mask[rows])], -1)  # (b, 2d)
                logits[rows, m] = linear(np.tanh(self._linear(gin, f + "gate.0")), self._w[f + "gate.2.weight"])[:, 0] \
                    + self._w[f + "gate.2.bias"][0]
            q, hq, _ = fusion_epilogue(q, outs, logits, present, self._w[f + "out.weight"], self._w[f + "out.bias"],
                                       self._w[f + "ffn.0.weight"], self._w[f + "ffn.0.bias"])
            q = q + self._linear(gelu(self._linear(hq, f + "ffn.1")), f + "ffn.4")
        if skip is not None:
            k = self.out_dim if dim is None else int(dim)
            e = self._ln(q, "head.0") @ self._w["head.1.weight"][:k].T + self._w["head.1.bias"][:k] + skip[:, :k]
            return ops.l2_normalize_ref(e.astype(_F32))
        return project_normalize(q, self._w["head.0.weight"], self._w["head.0.bias"], self._w["head.1.weight"],
                                 self._w["head.1.bias"], self.out_dim if dim is None else int(dim))


# What one more text-graph run costs, in padded tokens: a run has a fixed cost of about nine
# tokens' matmul work (MiniLM INT8 on one core: ~1.1 ms per run, ~0.12 ms per token); rounded up.
RUN_COST_TOKENS = 12


def length_groups(lengths: np.ndarray, run_cost: float = RUN_COST_TOKENS) -> list[tuple[int, int]]:
    """Split rows sorted by length into consecutive groups, each run padded to its longest row,
    minimising padded tokens + run_cost per run (exact dynamic programme).

    Args:
        lengths: (n,) real lengths, ascending.
        run_cost: the fixed cost of one more run, in tokens.

    Returns:
        [(start, end), ...] half-open row ranges covering 0..n in order.

    Raises:
        ValueError: lengths is not a 1-D ascending array of numbers >= 0, or run_cost < 0.
    """
    lens = np.asarray(lengths, np.float64)
    if lens.ndim != 1 or not np.isfinite(lens).all() or (lens < 0).any() or (np.diff(lens) < 0).any():
        raise ValueError(f"lengths must be a 1-D ascending array of finite numbers >= 0, got {lengths!r}")
    if not run_cost >= 0:
        raise ValueError(f"run_cost must be >= 0, got {run_cost!r}")
    n = len(lens)
    best = np.zeros(n + 1)  # best[j]: cost of rows [0, j)
    cut = np.zeros(n + 1, np.int64)
    for j in range(1, n + 1):  # last group [i, j) costs (j - i) * lengths[j - 1] + run_cost
        cost = best[:j] + (j - np.arange(j)) * lens[j - 1] + run_cost
        cut[j] = int(np.argmin(cost))
        best[j] = cost[cut[j]]
    out, j = [], n
    while j > 0:
        out.append((int(cut[j]), j))
        j = int(cut[j])
    return out[::-1]


class SplitRunner:
    """Runs a split engine on one padded batch in the embedder graph's input format.

    Args:
        image_session: ONNX Runtime session of the image graph (pixels -> image_tokens).
        text_session: session of the text graph (input_ids, attention_mask -> token_states),
            used for titles and traces alike.
        head: the `FusionHead`.
        completion_session: optional session of the image completion graph (token_states,
            attention_mask -> image_tokens; see `sdk.export.onnx_completion`).

    Each tower runs only on the rows that have its modality; the other rows get zeros, which the
    head never reads into the result. With `complete_image=True`, rows that have a title but no
    photo get image tokens completed from the title's token states and are fused as title + image.
    """

    def __init__(self, image_session, text_session, head: FusionHead, completion_session=None):
        self.image_session = image_session
        self.text_session = text_session
        self.head = head
        self.completion_session = completion_session
        # what the completion graph writes: its image tokens, and the photo's skip term where it has one
        names = [o.name for o in completion_session.get_outputs()] if completion_session is not None else []
        self._completion_outputs = ["image_tokens"] + (["image_skip"] if "image_skip" in names else [])

    def _states(self, ids: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
        B, T = ids.shape
        if not rows.size:
            return _zeros((B, T, self.head.text_dim))  # (B, T, C)
        lengths = np.maximum(mask[rows].sum(1), 1)  # real tokens per row (texts are right-padded)
        order = np.argsort(lengths, kind="stable")
        rows, lengths = rows[order], lengths[order]
        groups = length_groups(lengths)
        out = None
        for a, b in groups:
            n = int(lengths[b - 1])  # the longest row of the group: its padded length
            feed = {"input_ids": np.ascontiguousarray(ids[rows[a:b], :n]),
                    "attention_mask": np.ascontiguousarray(mask[rows[a:b], :n])}
            states = self.text_session.run(["token_states"], feed)[0]  # (b - a, n, C)
            if len(groups) == 1 and rows.size == B and n == T and (order == np.arange(B)).all():
                return states  # every row in order, unpadded: the graph's own output
            if out is None:
                out = np.zeros((B, T, self.head.text_dim), _F32)  # (B, T, C)
            out[rows[a:b], :n] = states
        return out

    def __call__(
        self, feed: Mapping[str, np.ndarray], dim: int | None = None, complete_image: bool = False
    ) -> np.ndarray:
        """Embeddings (B, dim) of a feed keyed like `sdk.contract.INPUT_NAMES`;
        complete_image=True fills a missing photo from the title (needs `completion_session`)."""
        present = np.array(feed["present"], _F32)  # (B, 3), a copy: completion marks rows present
        pixels = feed["pixels"]  # (B, 3, H, W)
        B = present.shape[0]
        n_tok = int(self.head.config.get("n_image_tokens", 49))
        rows = np.flatnonzero(present[:, 0] > 0)
        names = image_graph_outputs(self.head.skip_path)
        image_skip = None
        if rows.size == B:
            got = self.image_session.run(names, {"pixels": np.ascontiguousarray(pixels)})
            image, image_skip = got[0], (got[1] if self.head.skip_path else None)
        elif rows.size or complete_image:
            image = np.zeros((B, n_tok, self.head.d), _F32)  # (B, N, d)
            if self.head.skip_path:
                image_skip = np.zeros((B, self.head.out_dim), _F32)  # completion may write its rows
            if rows.size:
                got = self.image_session.run(names, {"pixels": np.ascontiguousarray(pixels[rows])})
                image[rows] = got[0]
                if self.head.skip_path:
                    image_skip[rows] = got[1]
        else:
            image = _zeros((B, n_tok, self.head.d))
        text_rows, trace_rows = np.flatnonzero(present[:, 1] > 0), np.flatnonzero(present[:, 2] > 0)
        text = self._states(feed["input_ids"], feed["attention_mask"], text_rows)
        trace = self._states(feed["trace_ids"], feed["trace_mask"], trace_rows)
        if complete_image:
            if self.completion_session is None:
                raise EngineError("this engine has no image completion part")
            fill = np.flatnonzero((present[:, 0] == 0) & (present[:, 1] > 0))
            if fill.size:
                n = max(int(feed["attention_mask"][fill].sum(1).max()), 1)
                cfeed = {"token_states": np.ascontiguousarray(text[fill, :n]),
                         "attention_mask": np.ascontiguousarray(feed["attention_mask"][fill, :n])}
                got = self.completion_session.run(self._completion_outputs, cfeed)
                image[fill] = got[0]
                if image_skip is not None and len(got) > 1:  # the completed photo's skip term, where written
                    image_skip[fill] = got[1]
                present[fill, 0] = 1.0
        text_mask = feed["attention_mask"].astype(_F32) * present[:, 1:2]
        trace_mask = feed["trace_mask"].astype(_F32) * present[:, 2:3]
        return self.head(image, text, text_mask, trace, trace_mask, present, dim, image_skip=image_skip)
