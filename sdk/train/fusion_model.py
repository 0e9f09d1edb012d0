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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .storage import load_fp32_state, merge_record, weights_sha256s, write_half
from .tower_tails import IMAGE_BLOCKS, NEG, ImageTail, MiniLMLayer

IMAGE, TEXT, TRACE = 0, 1, 2
MODALITIES = ("image", "text", "trace")
MAX_IMAGE_TUNED_BLOCKS = 5  # blocks 12-16: above the shallow taps (towers.SHALLOW_BLOCKS)


@dataclass
class EmbedderConfig:
    """Architecture of the trained part of the embedder (validated on creation)."""

    variant: str = "full"  # "full" | "no_fire" | "linear" (towers + linear projection only)
    d_model: int = 256
    n_heads: int = 4
    image_dim: int = 1280
    shallow_dim: int = 152
    text_dim: int = 384
    n_image_tokens: int = 49
    n_image_layers: int = 2
    fire_depths: tuple[int, ...] = (1, 2)  # FIRE after these image layers (1-based)
    fire_hidden: int = 128
    n_fusion_layers: int = 2
    ffn_mult: int = 4
    out_dim: int = 256
    matryoshka_dims: tuple[int, ...] = (64, 128, 256)
    dropout: float = 0.2
    # the towers this fusion model reads (a distilled student uses cheaper ones; see towers.load_towers)
    image_size: int = 224  # photo side in pixels; n_image_tokens = (image_size // 32) ** 2
    text_layers: int = 6  # MiniLM layers kept (the first ones)
    # the last `text_tuned_layers` of those were fine-tuned with this model: their weights are in
    # this model's state under `text_tail.*` and replace MiniLM's (towers.load_towers)
    text_tuned_layers: int = 0
    text_heads: int = 12  # the text tower's attention heads and FFN width (MiniLM's), for those layers
    text_ffn: int = 1536
    # the last `image_tuned_blocks` of EfficientNet-Lite0's 16 blocks and its head convolution were
    # fine-tuned with this model: their weights are in this model's state under `image_tail.*`
    image_tuned_blocks: int = 0
    # a skip path around the fusion: one linear map per modality from the towers' mean-pooled
    # features (photo: the image tower's deep map; title: the text tower's token states), added to
    # the head's output before the L2 norm, so what the frozen towers know stays reachable
    skip_path: bool = False
    # the title's skip term's weight in a vector that also has a photo (1: the same as in a title-only
    # vector). Photo + title vectors of unseen categories keep more of the text tower's own view of
    # the title with a larger weight; title-only and photo-only vectors do not change
    title_weight_with_photo: float = 1.0

    def __post_init__(self) -> None:
        self.fire_depths = tuple(int(k) for k in self.fire_depths)
        self.matryoshka_dims = tuple(int(k) for k in self.matryoshka_dims)
        if self.variant not in ("full", "no_fire", "linear"):
            raise ValueError(f"variant must be 'full', 'no_fire' or 'linear', got {self.variant!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.variant == "no_fire":
            self.fire_depths = ()
        if self.variant == "full" and len(self.fire_depths) < 2:
            raise ValueError(f"the full variant needs FIRE at >= 2 depths, got {self.fire_depths}")
        bad = [k for k in self.fire_depths if not 1 <= k <= self.n_image_layers]
        if bad:
            raise ValueError(f"fire_depths {bad} outside 1..n_image_layers={self.n_image_layers}")
        if not self.matryoshka_dims or self.matryoshka_dims[-1] != self.out_dim:
            raise ValueError(f"matryoshka_dims must end at out_dim={self.out_dim}, got {self.matryoshka_dims}")
        if list(self.matryoshka_dims) != sorted(set(self.matryoshka_dims)):
            raise ValueError(f"matryoshka_dims must be increasing, got {self.matryoshka_dims}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size < 64 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 64, got {self.image_size}")
        if self.text_layers < 1:
            raise ValueError(f"text_layers must be >= 1, got {self.text_layers}")
        if isinstance(self.text_tuned_layers, bool) or not 0 <= self.text_tuned_layers <= self.text_layers:
            raise ValueError(f"text_tuned_layers must be in 0..text_layers={self.text_layers}, "
                             f"got {self.text_tuned_layers!r}")
        if isinstance(self.image_tuned_blocks, bool) or not 0 <= self.image_tuned_blocks <= MAX_IMAGE_TUNED_BLOCKS:
            raise ValueError(f"image_tuned_blocks must be in 0..{MAX_IMAGE_TUNED_BLOCKS} (the blocks above the "
                             f"image tower's shallow taps), got {self.image_tuned_blocks!r}")
        if self.image_tuned_blocks and self.image_dim != 1280:
            raise ValueError("fine-tuned image blocks give EfficientNet-Lite0's 1280-d tokens; "
                             f"image_dim is {self.image_dim}")
        if self.skip_path and self.variant == "linear":
            raise ValueError("the 'linear' variant is a skip path already; skip_path needs 'full' or 'no_fire'")
        self.title_weight_with_photo = float(self.title_weight_with_photo)
        if not (math.isfinite(self.title_weight_with_photo) and self.title_weight_with_photo > 0):
            raise ValueError(f"title_weight_with_photo must be a finite number > 0, got {self.title_weight_with_photo}")
        if self.title_weight_with_photo != 1.0 and not self.skip_path:
            raise ValueError("title_weight_with_photo weighs the skip path's title term: it needs skip_path")
        if (self.text_tuned_layers or self.image_tuned_blocks) and self.variant == "linear":
            raise ValueError("the 'linear' variant cannot fine-tune tower layers")
        if self.text_tuned_layers and (self.text_heads < 1 or self.text_dim % self.text_heads or self.text_ffn < 1):
            raise ValueError(f"text_dim ({self.text_dim}) must split into text_heads ({self.text_heads}) heads, "
                             f"text_ffn ({self.text_ffn}) >= 1")

    @property
    def text_tuned_first(self) -> int:
        """Index (0-based) of the first fine-tuned MiniLM layer: the layers below it are frozen."""
        return self.text_layers - self.text_tuned_layers

    @property
    def image_tuned_first(self) -> int:
        """Index (0-based) of the first fine-tuned EfficientNet block."""
        return IMAGE_BLOCKS - self.image_tuned_blocks

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "EmbedderConfig":
        return cls(**json.loads(text))


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
    ) -> torch.Tensor:
        return F.normalize(self.raw(img_deep, img_shallow, text_tok, text_mask, trace_tok, trace_mask, present,
                                    image_keep, image_tokens, image_pooled), dim=-1)

    def raw(self, img_deep, img_shallow, text_tok, text_mask, trace_tok, trace_mask, present, image_keep=None,
            image_tokens=None, image_pooled=None) -> torch.Tensor:
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
            out = out + self.skip(img_deep, image_pooled, text_tok, masks[TEXT], present)
        return out

    def skip(self, img_deep, image_pooled, text_tok, text_mask, present) -> torch.Tensor:
        """The skip path's term (B, out_dim): the linear maps of the present modalities' pooled
        tower features (a photo without `img_deep` or `image_pooled`, as completed tokens are,
        adds nothing). The title's term weighs `cfg.title_weight_with_photo` where a photo is present."""
        w = 1.0 + (self.cfg.title_weight_with_photo - 1.0) * present[:, IMAGE:IMAGE + 1]
        out = self.skip_text(masked_mean(text_tok, text_mask)) * present[:, TEXT:TEXT + 1] * w
        if image_pooled is None and img_deep is not None:
            image_pooled = img_deep.mean(1)
        if image_pooled is not None:
            out = out + self.skip_image(image_pooled) * present[:, IMAGE:IMAGE + 1]
        return out


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


def set_title_weight_with_photo(folder: str | Path, weight: float) -> EmbedderConfig:
    """Set a saved skip-path embedder's `title_weight_with_photo` (its embedder.json; the weights
    do not change). Returns the new config.

    Raises:
        ValueError: the embedder has no skip path, or `weight` is not a finite number > 0.
    """
    path = Path(folder) / "embedder.json"
    meta = json.loads(path.read_text())
    cfg = EmbedderConfig(**{**meta["config"], "title_weight_with_photo": weight})
    meta["config"] = json.loads(cfg.to_json())
    path.write_text(json.dumps(meta, indent=2))
    return cfg


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sdk.train.fusion_model",
                                 description="Copy a saved embedder with fp16 weights (DST may be SRC: converted in "
                                             "place), optionally setting its title weight in photo + title vectors")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--title-weight-with-photo", type=float, default=None, metavar="W",
                    help="EmbedderConfig.title_weight_with_photo of the copy (a skip-path embedder; default: the source's)")
    a = ap.parse_args(argv)
    if a.title_weight_with_photo is not None:  # refuse before writing anything
        EmbedderConfig(**{**json.loads((Path(a.src) / "embedder.json").read_text())["config"],
                          "title_weight_with_photo": a.title_weight_with_photo})
    out = copy_half(a.src, a.dst, a.dtype)
    if a.title_weight_with_photo is not None:
        set_title_weight_with_photo(a.dst, a.title_weight_with_photo)
    print(out)


if __name__ == "__main__":
    main()
