"""The reference (teacher) product embedder, MOON3.0-style, on top of frozen pretrained towers.

    image tower (EfficientNet-Lite0)  ->  49 deep tokens (B, 49, 1280) + 49 shallow tokens (B, 49, 152)
    text tower  (all-MiniLM-L6-v2)    ->  title token states (B, T, 384)
    trace       (same text tower)     ->  reasoning-trace token states (B, S, 384)

    ImageEncoder: project deep tokens to d, transformer layers; FIRE re-injects the shallow tokens
                  after chosen layers through a per-token saliency gate (scale initialised at 0).
    ModalityFusion (x n_fusion_layers): a learned query (offset by the mean of the present
                  modalities' pooled tokens) attends to each modality with its own
                  multi-head cross-attention; a softmax gate over present modalities, computed from
                  the query and each modality's summary, mixes them; residual with a
                  zero-initialised output projection; then an FFN.
    Head: LayerNorm -> Linear(d, 256) -> L2 normalise. Matryoshka-trained: the 64/128/256-d
                  prefixes, each re-normalised, are embeddings too.

Modalities may be missing per item (`present`, (B, 3) of 0/1): image-only, text-only and
image+text products land in one space.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .embedder_config import MAX_IMAGE_TUNED_BLOCKS, EmbedderConfig  # noqa: F401 (re-exported)
from .storage import load_fp32_state, merge_record, weights_sha256s, write_half
from .tower_tails import NEG, ImageTail, MiniLMLayer

IMAGE, TEXT, TRACE = 0, 1, 2
MODALITIES = ("image", "text", "trace")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # x: (B, T, C), mask: (B, T) -> (B, C); an all-zero mask gives zeros
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class Attention(nn.Module):
    """Multi-head attention, written out so the ONNX graph stays plain MatMul/Softmax."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.h = n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)
        self.drop = dropout

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None) -> torch.Tensor:
        B, Tq, C = x.shape
        Tk = ctx.shape[1]
        q = self.q(x).view(B, Tq, self.h, C // self.h).transpose(1, 2)  # (B, h, Tq, c)
        k, v = self.kv(ctx).view(B, Tk, 2, self.h, C // self.h).permute(2, 0, 3, 1, 4)  # (B, h, Tk, c)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.h))  # (B, h, Tq, Tk)
        if ctx_mask is not None:
            att = att + (1.0 - ctx_mask.to(att.dtype))[:, None, None, :] * NEG
        att = F.dropout(att.softmax(-1), self.drop, self.training)
        y = (att @ v).transpose(1, 2).reshape(B, Tq, C)  # (B, Tq, C)
        return self.o(y)


class FFN(nn.Sequential):
    def __init__(self, d: int, mult: int, dropout: float):
        super().__init__(nn.LayerNorm(d), nn.Linear(d, mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * d, d))


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer over the image tokens."""

    def __init__(self, d: int, n_heads: int, mult: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = Attention(d, n_heads, dropout)
        self.ffn = FFN(d, mult, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, None)
        return x + self.ffn(x)


class FIRE(nn.Module):
    """Fine-grained residual enhancement: h_i += s * a_i * MLP(shallow_i), a_i = sigmoid(w^T GELU(W LN(h_i)))."""

    def __init__(self, d: int, shallow_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.gate_in = nn.Linear(d, hidden)
        self.gate_out = nn.Linear(hidden, 1)
        self.mlp = nn.Sequential(nn.LayerNorm(shallow_dim), nn.Linear(shallow_dim, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        # h: (B, N, d) deep token states; shallow: (B, N, Cs) shallow tokens at the same positions
        a = torch.sigmoid(self.gate_out(F.gelu(self.gate_in(self.norm(h)))))  # (B, N, 1)
        return h + self.scale * a * self.mlp(shallow)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        d = cfg.d_model
        self.proj = nn.Sequential(nn.Linear(cfg.image_dim, d), nn.LayerNorm(d))
        self.pos = nn.Parameter(torch.zeros(1, cfg.n_image_tokens, d))
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout)
                                    for _ in range(cfg.n_image_layers))
        self.fire = nn.ModuleDict({str(k): FIRE(d, cfg.shallow_dim, cfg.fire_hidden) for k in cfg.fire_depths})
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        x = self.proj(deep) + self.pos  # (B, 49, d)
        for k, layer in enumerate(self.layers, 1):
            x = layer(x)
            if str(k) in self.fire:
                x = self.fire[str(k)](x, shallow)
        return x


class ModalityFusion(nn.Module):
    """One round of multi-head modality fusion for a single learned query."""

    def __init__(self, cfg: EmbedderConfig, n_modalities: int = 3):
        super().__init__()
        d = cfg.d_model
        self.q_norm = nn.LayerNorm(d)
        self.kv_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_modalities))
        self.attn = nn.ModuleList(Attention(d, cfg.n_heads, cfg.dropout) for _ in range(n_modalities))
        self.gate = nn.Sequential(nn.Linear(2 * d, d), nn.Tanh(), nn.Linear(d, 1))
        self.out = nn.Linear(d, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.ffn = FFN(d, cfg.ffn_mult, cfg.dropout)

    def forward(self, q, tokens, masks, present):
        # q: (B, 1, d); tokens[m]: (B, T_m, d); masks[m]: (B, T_m); present: (B, M)
        qn = self.q_norm(q)
        outs, logits = [], []
        for m, (tok, mask) in enumerate(zip(tokens, masks)):
            kv = self.kv_norms[m](tok)
            outs.append(self.attn[m](qn, kv, mask))  # (B, 1, d)
            summary = masked_mean(kv, mask).unsqueeze(1)  # (B, 1, d)
            logits.append(self.gate(torch.cat([qn, summary], dim=-1)))  # (B, 1, 1)
        logits = torch.cat(logits, dim=-1) + (1.0 - present.unsqueeze(1)) * NEG  # (B, 1, M)
        w = logits.softmax(-1)
        fused = (torch.stack(outs, dim=-1) * w.unsqueeze(2)).sum(-1)  # (B, 1, d)
        q = q + self.out(fused)
        return q + self.ffn(q), w.squeeze(1)


class SkipPath(nn.Module):
    """Mean-pooled tower features (B, C) -> (B, out): standardised by the training set's per-channel
    statistics (fixed buffers), then one linear map that starts at zero (the fusion's output is
    where training starts)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("inv_std", torch.ones(d_in))
        self.proj = nn.Linear(d_in, d_out)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.inv_std.copy_(1.0 / std)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj((pooled - self.mean) * self.inv_std)


class FusionEmbedder(nn.Module):
    """Trained part of the teacher: tower tokens -> (B, out_dim) L2-normalised embedding."""

    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        if cfg.variant == "linear":
            raise ValueError("use LinearEmbedder for the 'linear' variant")
        self.cfg = cfg
        d = cfg.d_model
        self.image = ImageEncoder(cfg)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.LayerNorm(d))
        self.trace_proj = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.LayerNorm(d))
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.fusion = nn.ModuleList(ModalityFusion(cfg) for _ in range(cfg.n_fusion_layers))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.out_dim))
        self.last_gate: torch.Tensor | None = None
        if cfg.skip_path:
            self.skip_image = SkipPath(cfg.image_dim, cfg.out_dim)
            self.skip_text = SkipPath(cfg.text_dim, cfg.out_dim)
        if cfg.image_tuned_blocks:
            self.image_tail = ImageTail(cfg.image_tuned_blocks)
        if cfg.text_tuned_layers:
            self.text_tail = nn.ModuleList(MiniLMLayer(cfg.text_dim, cfg.text_heads, cfg.text_ffn)
                                           for _ in range(cfg.text_tuned_layers))

    def tune_image(self, mid: torch.Tensor) -> torch.Tensor:
        """The fine-tuned last image blocks over the map entering them (B, C, h, w): the deep
        tokens (B, g*g, 1280) the whole image tower gives. Like `tune_text`, training runs it over
        a cache; `forward` never does."""
        return self.image_tail(mid)

    def tune_text(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The fine-tuned last text layers over the token states of the layers before them
        (text_layers - text_tuned_layers of MiniLM's): what the whole text tower gives. Training
        reads cached states of the frozen layers and runs only these; `forward` takes the
        tower's output and never runs them."""
        for layer in getattr(self, "text_tail", ()):
            states = layer(states, mask)
        return states

    def encode_image(self, img_deep: torch.Tensor, img_shallow: torch.Tensor) -> torch.Tensor:
        """Image token states (B, 49, d); independent of the text, so one pass serves many views."""
        return self.image(img_deep, img_shallow)

    def forward(
        self,
        img_deep: torch.Tensor,  # (B, 49, 1280)
        img_shallow: torch.Tensor,  # (B, 49, 152)
        text_tok: torch.Tensor,  # (B, T, 384)
        text_mask: torch.Tensor,  # (B, T)
        trace_tok: torch.Tensor,  # (B, S, 384)
        trace_mask: torch.Tensor,  # (B, S)
        present: torch.Tensor,  # (B, 3) float 0/1: image, text, trace
        image_keep: torch.Tensor | None = None,  # (B, 49) optional token dropout mask (training)
        image_tokens: torch.Tensor | None = None,  # (B, 49, d) from encode_image, to reuse across calls
        image_pooled: torch.Tensor | None = None,  # (B, 1280) the skip path's photo features (default: img_deep's mean)
        parts: tuple[torch.Tensor, torch.Tensor] | None = None,  # (photo-only, title-only) unit vectors, if known
        image_skip: torch.Tensor | None = None,  # (B, out_dim) the photo's skip term itself (a completed photo's)
    ) -> torch.Tensor:
        out = F.normalize(self.raw(img_deep, img_shallow, text_tok, text_mask, trace_tok, trace_mask, present,
                                   image_keep, image_tokens, image_pooled, image_skip), dim=-1)
        beta, title_beta = self.cfg.blend_weights()
        both = present[:, IMAGE] * present[:, TEXT]
        if not (beta or title_beta) or (not torch.onnx.is_in_onnx_export() and not bool(both.any())):
            return out  # (an exported graph blends every row, by beta * both)
        if parts is None:  # the same inputs with one modality each (`parts` saves training these passes)
            alone = lambda m: present * F.one_hot(torch.tensor(m), present.shape[1]).to(present.dtype)  # noqa: E731
            parts = tuple(F.normalize(self.raw(img_deep, img_shallow, text_tok, text_mask, trace_tok, trace_mask,
                                               alone(m), image_keep, image_tokens, image_pooled, image_skip), dim=-1)
                          for m in (IMAGE, TEXT))
        return blend(out, parts[0], parts[1], beta * both, title_beta * both)

    def raw(self, img_deep, img_shallow, text_tok, text_mask, trace_tok, trace_mask, present, image_keep=None,
            image_tokens=None, image_pooled=None, image_skip=None) -> torch.Tensor:
        """`forward`'s output before the L2 norm (B, out_dim)."""
        img = self.encode_image(img_deep, img_shallow) if image_tokens is None else image_tokens
        img_mask = torch.ones(img.shape[:2], dtype=img.dtype, device=img.device)
        if image_keep is not None:
            img_mask = img_mask * image_keep
        tokens = [img, self.text_proj(text_tok), self.trace_proj(trace_tok)]
        masks = [img_mask * present[:, IMAGE:IMAGE + 1], text_mask.to(img.dtype), trace_mask.to(img.dtype)]
        # The query starts from the learned vector plus the mean of the present modalities' pooled
        # tokens, so the zero-initialised fusion rounds refine an informative state.
        pooled = torch.stack([masked_mean(t, m) for t, m in zip(tokens, masks)], dim=1)  # (B, M, d)
        start = (pooled * present.unsqueeze(-1)).sum(1) / present.sum(1, keepdim=True).clamp(min=1.0)
        q = self.query + start.unsqueeze(1)  # (B, 1, d)
        for layer in self.fusion:
            q, gate = layer(q, tokens, masks, present)
        self.last_gate = gate.detach()
        out = self.head(q.squeeze(1))  # (B, out_dim)
        if self.cfg.skip_path:
            out = out + self.skip(img_deep, image_pooled, text_tok, masks[TEXT], present, image_skip)
        return out

    def skip(self, img_deep, image_pooled, text_tok, text_mask, present, image_skip=None) -> torch.Tensor:
        """The skip path's term (B, out_dim): the linear maps of the present modalities' pooled
        tower features; `image_skip`, where given, is the photo's term itself (a completed photo's);
        a photo with none of the three adds nothing. The title's term weighs
        `cfg.title_weight_with_photo` where a photo is present."""
        w = 1.0 + (self.cfg.title_weight_with_photo - 1.0) * present[:, IMAGE:IMAGE + 1]
        out = self.skip_text(masked_mean(text_tok, text_mask)) * present[:, TEXT:TEXT + 1] * w
        if image_skip is not None:
            return out + image_skip * present[:, IMAGE:IMAGE + 1]
        if image_pooled is None and img_deep is not None:
            image_pooled = img_deep.mean(1)
        if image_pooled is not None:
            out = out + self.skip_image(image_pooled) * present[:, IMAGE:IMAGE + 1]
        return out


def blend(fused: torch.Tensor, photo: torch.Tensor, title: torch.Tensor, beta: torch.Tensor | float,
          title_beta: torch.Tensor | float | None = None) -> torch.Tensor:
    """normalise(fused + beta * photo + title_beta * title) (`EmbedderConfig.modality_blend`,
    `title_blend`); each weight (B,) or a number, title_beta None meaning beta."""
    beta = torch.as_tensor(beta, dtype=fused.dtype).reshape(-1, 1)
    title_beta = beta if title_beta is None else torch.as_tensor(title_beta, dtype=fused.dtype).reshape(-1, 1)
    return F.normalize(fused + beta * photo + title_beta * title, dim=-1)


class LinearEmbedder(nn.Module):
    """Ablation (a): mean-pooled tower features, one linear projection per modality, summed."""

    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        self.cfg = cfg
        self.image = nn.Linear(cfg.image_dim, cfg.out_dim)
        self.text = nn.Linear(cfg.text_dim, cfg.out_dim)
        self.trace = nn.Linear(cfg.text_dim, cfg.out_dim)

    def encode_image(self, img_deep: torch.Tensor, img_shallow: torch.Tensor) -> torch.Tensor:
        return img_deep

    def forward(
        self, img_deep, img_shallow, text_tok, text_mask, trace_tok, trace_mask, present, image_keep=None, image_tokens=None
    ):
        keep = torch.ones(img_deep.shape[:2], dtype=img_deep.dtype, device=img_deep.device)
        if image_keep is not None:
            keep = keep * image_keep
        e = (
            self.image(masked_mean(img_deep, keep)) * present[:, IMAGE:IMAGE + 1]
            + self.text(masked_mean(text_tok, text_mask)) * present[:, TEXT:TEXT + 1]
            + self.trace(masked_mean(trace_tok, trace_mask)) * present[:, TRACE:TRACE + 1]
        )
        return F.normalize(e, dim=-1)


def build_embedder(cfg: EmbedderConfig) -> nn.Module:
    return LinearEmbedder(cfg) if cfg.variant == "linear" else FusionEmbedder(cfg)


def matryoshka(e: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` components of embeddings, re-normalised."""
    return F.normalize(e[..., :dim], dim=-1)


def save_embedder(model: nn.Module, folder: str | Path, metrics: dict | None = None) -> Path:
    """Write `embedder.safetensors` + `embedder.json` (config, metrics) into folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "embedder.safetensors"))
    meta = {"config": json.loads(model.cfg.to_json()), "metrics": metrics or {}}
    (folder / "embedder.json").write_text(json.dumps(meta, indent=2))
    return folder / "embedder.safetensors"


def load_embedder(folder: str | Path) -> nn.Module:
    """Load what `save_embedder` or `copy_half` wrote (no pickle: safetensors + JSON), in fp32."""
    folder = Path(folder)
    meta_path, w_path = folder / "embedder.json", folder / "embedder.safetensors"
    for p in (meta_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"embedder file not found: {p}")
    cfg = EmbedderConfig(**json.loads(meta_path.read_text())["config"])
    model = build_embedder(cfg)
    model.load_state_dict(load_fp32_state(w_path))  # fp16-stored weights (copy_half) come back as fp32
    return model.eval()


def embedder_sha256s(folder: str | Path) -> tuple[str, ...]:
    """The SHA-256s naming the embedder weights in `folder`: the file's own and, for an fp16 copy
    (`copy_half`), the FP32 file it was converted from (`sdk.train.storage.weights_sha256s`)."""
    folder = Path(folder)
    meta_path = folder / "embedder.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return weights_sha256s(folder / "embedder.safetensors", meta)


def copy_half(src: str | Path, dst: str | Path, dtype: str = "float16") -> Path:
    """Copy a saved embedder with its weights stored as fp16 (half the bytes; `load_embedder`
    loads them back into the fp32 model). `dst` may be `src` (converted in place).

    embedder.json records the stored dtype and the SHA-256 of the FP32 source and of the copy."""
    src, dst = Path(src), Path(dst)
    meta = json.loads((src / "embedder.json").read_text())
    record = write_half(src / "embedder.safetensors", dst / "embedder.safetensors", dtype)
    (dst / "embedder.json").write_text(json.dumps(merge_record(meta, record), indent=2))
    return dst / "embedder.safetensors"


# the config fields that change how vectors are made from trained weights without new weights:
# `set_config` and `python -m sdk.train.fusion_model` set them on a copy; `train_embedder` trains with them
POST_HOC_FIELDS = ("title_weight_with_photo", "modality_blend", "title_blend")


def config_flags(args) -> dict:
    """The POST_HOC_FIELDS an argparse namespace sets (its --title-weight-with-photo, --modality-blend, --title-blend)."""
    return {k: getattr(args, k) for k in POST_HOC_FIELDS if getattr(args, k, None) is not None}


def set_config(folder: str | Path, **fields) -> EmbedderConfig:
    """Set fields of a saved embedder's config that need no new weights (`title_weight_with_photo`,
    `modality_blend`, `title_blend`) in its embedder.json. Returns the new config.

    Raises:
        ValueError: a field is not one of those, or the config refuses its value.
    """
    bad = sorted(set(fields) - set(POST_HOC_FIELDS))
    if bad:
        raise ValueError(f"only {list(POST_HOC_FIELDS)} can be set on trained weights, not {bad}")
    path = Path(folder) / "embedder.json"
    meta = json.loads(path.read_text())
    cfg = EmbedderConfig(**{**meta["config"], **fields})
    meta["config"] = json.loads(cfg.to_json())
    path.write_text(json.dumps(meta, indent=2))
    return cfg


def set_title_weight_with_photo(folder: str | Path, weight: float) -> EmbedderConfig:
    """`set_config(folder, title_weight_with_photo=weight)`: the weight of a skip-path embedder's title term."""
    return set_config(folder, title_weight_with_photo=weight)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sdk.train.fusion_model",
                                 description="Copy a saved embedder with fp16 weights (DST may be SRC: converted in "
                                             "place), optionally setting how its photo + title vectors are made")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--title-weight-with-photo", type=float, default=None, metavar="W",
                    help="EmbedderConfig.title_weight_with_photo of the copy (a skip-path embedder; default: the source's)")
    ap.add_argument("--modality-blend", type=float, default=None, metavar="B",
                    help="EmbedderConfig.modality_blend of the copy (default: the source's)")
    ap.add_argument("--title-blend", type=float, default=None, metavar="T",
                    help="EmbedderConfig.title_blend of the copy: the title-only vector's weight in the blend "
                         "(default: the source's)")
    a = ap.parse_args(argv)
    fields = config_flags(a)
    # refuse (ValueError) before writing anything
    EmbedderConfig(**{**json.loads((Path(a.src) / "embedder.json").read_text())["config"], **fields})
    out = copy_half(a.src, a.dst, a.dtype)
    if fields:
        set_config(a.dst, **fields)
    print(out)


if __name__ == "__main__":
    main()
