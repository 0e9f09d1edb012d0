"""The product reasoner: a small decoder-only LM that reads a product photo and/or text and writes text.

    photo -> EfficientNet-Lite0 deep tokens (49, 1280) -> Resampler -> 16 visual tokens (16, d)
    prompt + answer tokens -> decoder layers (pre-LN, causal self-attention, KV cache)
        each layer l: PUMGPT layer-wise adapter = its own small projection of the visual tokens to
        extra keys/values, attended with a separate softmax and added as tanh(g_l) * attn_visual,
        g_l initialised at 0 (so training starts from the text-only model). The visual tokens do
        not lengthen the text sequence.
    -> LM head (tied to the token embedding)

Trained from scratch on the catalog (see `train_reasoner.py` and the model card): no PyPI package
carries a small enough pretrained LM (the smallest, SmolLM2-135M, is 135M parameters, ten times
this budget, and ships only as a 4-bit GGUF for llama.cpp).

Tasks, one instruction template each (`TASKS`), answers built from the catalog's fields:
captioning (the title from the photo; MMPCBench's missing-title completion), category QA,
attribute extraction (`key: value` pairs), attribute QA, free-form QA over the product's fields,
and the Think-Then-Embed reasoning trace (`<think> attribute reasoning </think> summary`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# the runtime's token contract: special tokens, their ids, and decoding
from sdk.reasoner import BOS, END_THINK, EOS, PAD, SEP, SPECIALS, THINK  # noqa: F401
from sdk.reasoner import decode_ids as decode  # noqa: F401

# Fields of the catalog record used for attributes, in the order they are written; catalog
# attribute names are lower-cased ("Sleeve Length" -> "sleeve length").
RECORD_FIELDS = (("article_type", "article type"), ("base_colour", "colour"), ("gender", "gender"),
                 ("usage", "usage"), ("season", "season"))
ATTRIBUTE_KEYS = ("Pattern", "Fabric", "Sleeve Length", "Fit", "Neck", "Occasion", "Collar", "Material", "Length",
                  "Type", "Ankle Height", "Waist Rise", "Sport")
MAX_ATTRIBUTES = 8  # attribute-extraction answers list at most this many pairs

# One instruction template per task. {key} is filled for attribute QA, {question} for free-form QA.
TASKS = {
    "caption": "Write the product title.",
    "category": "What article type is this?",
    "attributes": "List the product's attributes as key: value pairs.",
    "attribute_qa": "What is the {key}?",
    "qa": "{question}",
    "trace": "Think about the product's attributes, then summarise it in one line.",
}
# Free-form questions answered from a record field: (question, field)
QA = (("Which brand makes this product?", "brand"), ("Who is this product for?", "gender"),
      ("For which season is it?", "season"), ("What is it used for?", "usage"),
      ("Which category does it belong to?", "sub_category"))


@dataclass
class ReasonerConfig:
    vocab_size: int = 2048
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: int = 4
    max_len: int = 160
    visual_dim: int = 1280  # EfficientNet-Lite0 deep token width
    n_visual: int = 16  # resampled visual tokens
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("vocab_size", "n_layers", "max_len", "n_visual", "visual_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < len(SPECIALS) + 1:
            raise ValueError(f"vocab_size must exceed the {len(SPECIALS)} special tokens")


class Resampler(nn.Module):
    """n learned queries cross-attend over the image tower's deep tokens -> (B, n, d)."""

    def __init__(self, cfg: ReasonerConfig):
        super().__init__()
        d = cfg.d_model
        self.proj = nn.Sequential(nn.Linear(cfg.visual_dim, d), nn.LayerNorm(d))
        self.queries = nn.Parameter(torch.randn(1, cfg.n_visual, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, cfg.n_heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Linear(cfg.ffn_mult * d, d))

    def forward(self, deep: torch.Tensor) -> torch.Tensor:
        x = self.proj(deep.float())  # (B, N, d)
        q = self.queries.expand(x.shape[0], -1, -1)
        v = q + self.attn(q, x, x, need_weights=False)[0]  # (B, n, d)
        return v + self.ffn(self.norm(v))


class DecoderLayer(nn.Module):
    """Pre-LN causal self-attention + FFN, with a PUMGPT visual adapter (tanh-gated extra keys/values)."""

    def __init__(self, cfg: ReasonerConfig):
        super().__init__()
        d = cfg.d_model
        self.h = cfg.n_heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Linear(cfg.ffn_mult * d, d))
        # the layer's own adapter: visual tokens -> keys and values of this layer
        self.adapter = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d))
        self.gate = nn.Parameter(torch.zeros(1))  # g_l; tanh(0) = 0: starts as the text-only model
        self.drop = cfg.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, h, T, c)
        B, T, d = x.shape
        return x.view(B, T, self.h, d // self.h).transpose(1, 2)

    def visual_kv(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.adapter(visual).chunk(2, dim=-1)  # (B, n, d) each
        return self._heads(k), self._heads(v)

    def forward(self, x, past=None, visual_kv=None, visual_mask=None):
        """x: (B, T, d) new positions; past: (k, v) of earlier positions (B, h, P, c) or None;
        visual_kv: this layer's (k, v) of the visual tokens or None; visual_mask: (B,) 1 where an
        item has a photo. Returns (x, (k, v) for the cache)."""
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        P = k.shape[2] - T
        # causal over the cache + new positions (new position i sees 0..P+i)
        causal = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=self.drop if self.training else 0.0)
        if visual_kv is not None:
            yv = F.scaled_dot_product_attention(q, *visual_kv)  # (B, h, T, c): a separate softmax
            gate = torch.tanh(self.gate)
            if visual_mask is not None:
                gate = gate * visual_mask.view(B, 1, 1, 1).to(yv.dtype)
            y = y + gate * yv
        x = x + self.o(y.transpose(1, 2).reshape(B, T, d))
        x = x + F.dropout(self.ffn(self.norm2(x)), self.drop, self.training)
        return x, (k, v)


class Reasoner(nn.Module):
    def __init__(self, cfg: ReasonerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.max_len, d)
        self.resampler = Resampler(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.01)

    def visual(self, deep: torch.Tensor | None):
        """Per-layer visual keys/values from deep tokens (B, 49, 1280), or None without a photo."""
        if deep is None:
            return None
        vis = self.resampler(deep)
        return [layer.visual_kv(vis) for layer in self.layers]

    def forward(self, ids, deep=None, visual_mask=None, past=None, visual_kv=None, return_hidden: int | None = None):
        """Logits (B, T, V) for token ids (B, T) after `past` positions, and the new cache.

        Args:
            ids: (B, T) token ids. deep: (B, 49, 1280) photo features or None.
            visual_mask: (B,) 1 where the item has a photo (rows without one ignore the adapters).
            past: per-layer (k, v) from an earlier call. visual_kv: precomputed `visual(deep)`.
            return_hidden: also return the hidden states after this many layers (TTE-style heads).
        """
        B, T = ids.shape
        start = 0 if past is None else past[0][0].shape[2]
        if start + T > self.cfg.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_len {self.cfg.max_len}")
        if visual_kv is None and deep is not None:
            visual_kv = self.visual(deep)
        x = self.embed(ids) + self.pos(torch.arange(start, start + T, device=ids.device))
        cache, hidden = [], None
        for n, layer in enumerate(self.layers):
            x, kv = layer(x, None if past is None else past[n], None if visual_kv is None else visual_kv[n], visual_mask)
            cache.append(kv)
            if return_hidden == n + 1:
                hidden = x
        logits = self.norm(x) @ self.embed.weight.T  # tied head
        return (logits, cache, hidden) if return_hidden else (logits, cache)

    @torch.inference_mode()
    def generate(self, prompt: Sequence[int], deep: torch.Tensor | None = None, max_new_tokens: int = 64,
                 use_cache: bool = True) -> list[int]:
        """Greedy decoding of one prompt (deterministic); stops at <eos> or the budget.

        Args:
            prompt: token ids (starting with <bos>). deep: (49, 1280) or (1, 49, 1280) photo features.
            use_cache: reuse keys/values (the default); False recomputes every step (for checking).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if deep is not None and deep.dim() == 2:
            deep = deep[None]
        vkv = self.visual(deep)
        vmask = None if deep is None else torch.ones(1)
        ids = list(prompt)
        budget = min(max_new_tokens, self.cfg.max_len - len(ids))
        out: list[int] = []
        past = None
        step = torch.tensor([ids])
        for _ in range(budget):
            if use_cache:
                logits, past = self(step, visual_mask=vmask, past=past, visual_kv=vkv)
            else:
                logits, _ = self(torch.tensor([ids + out]), visual_mask=vmask, visual_kv=vkv)
            nxt = int(logits[0, -1].argmax())
            if nxt == EOS:
                break
            out.append(nxt)
            step = torch.tensor([[nxt]])
        return out


# ---------------------------------------------------------------------------------------------
# tokenizer and task data


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer (the `tokenizers` library) with SPECIALS at ids 0..5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def record_attributes(record: dict) -> list[tuple[str, str]]:
    """(key, value) pairs of a catalog record: the main fields, then up to MAX_ATTRIBUTES in total."""
    pairs = [(name, str(record[f]).strip()) for f, name in RECORD_FIELDS if str(record.get(f) or "").strip()]
    attrs = record.get("attributes") or {}
    pairs += [(k.lower(), str(attrs[k]).strip()) for k in ATTRIBUTE_KEYS if str(attrs.get(k) or "").strip()]
    return pairs[:MAX_ATTRIBUTES]


def format_attributes(pairs: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in pairs)


def parse_attributes(text: str) -> dict[str, str]:
    """Inverse of `format_attributes` (lenient: malformed pieces are skipped)."""
    out = {}
    for piece in text.split(";"):
        k, sep, v = piece.partition(":")
        if sep and k.strip() and v.strip():
            out[k.strip().lower()] = v.strip()
    return out


def trace_target(record: dict) -> str:
    """The Think-Then-Embed SFT target: `<think> attribute reasoning </think> one-line summary`."""
    pairs = record_attributes(record)
    a = dict(pairs)
    steps = [f"the {k} is {v}" for k, v in pairs]
    summary = " ".join(x for x in (a.get("gender"), a.get("colour"), a.get("pattern"), a.get("article type")) if x)
    if record.get("brand"):
        summary += f" by {record['brand']}"
    if a.get("usage"):
        summary += f" for {a['usage'].lower()} use"
    return f"<think> {'; '.join(steps)} </think> {summary.strip()}"


def examples(record: dict, rng: random.Random, tasks: Sequence[str] = tuple(TASKS)) -> list[tuple[str, str, str, bool]]:
    """(task, prompt, answer, use_title) for one product; the photo is always offered to the model.

    use_title says whether the title is given as context (never for captioning).
    """
    out = []
    pairs = record_attributes(record)
    for task in tasks:
        use_title = task != "caption" and rng.random() < 0.5
        if task == "caption":
            out.append((task, TASKS[task], record["title"], False))
        elif task == "category" and record.get("article_type"):
            out.append((task, TASKS[task], record["article_type"], use_title))
        elif task == "attributes" and pairs:
            out.append((task, TASKS[task], format_attributes(pairs), use_title))
        elif task == "attribute_qa" and pairs:
            k, v = rng.choice(pairs)
            out.append((task, TASKS[task].format(key=k), v, use_title))
        elif task == "qa":
            avail = [(q, f) for q, f in QA if str(record.get(f) or "").strip()]
            if avail:
                q, f = rng.choice(avail)
                out.append((task, TASKS[task].format(question=q), str(record[f]).strip(), use_title))
        elif task == "trace" and pairs:
            out.append((task, TASKS[task], trace_target(record), use_title))
    return out


def prompt_text(instruction: str, title: str | None) -> str:
    return f"{instruction} title: {title}" if title else instruction


def encode_example(tok, instruction: str, answer: str | None, title: str | None) -> tuple[list[int], int]:
    """Token ids `<bos> prompt <sep> answer <eos>` and the index where the answer starts."""
    prompt = [BOS] + tok.encode(prompt_text(instruction, title)).ids + [SEP]
    if answer is None:
        return prompt, len(prompt)
    return prompt + _encode_answer(tok, answer) + [EOS], len(prompt)


def _encode_answer(tok, answer: str) -> list[int]:
    # <think> / </think> are special tokens: encode the pieces between them
    ids: list[int] = []
    rest = answer
    while rest:
        i = min((p for p in (rest.find("<think>"), rest.find("</think>")) if p >= 0), default=-1)
        if i < 0:
            ids += tok.encode(rest).ids
            break
        if i:
            ids += tok.encode(rest[:i]).ids
        special = "<think>" if rest.startswith("<think>", i) else "</think>"
        ids.append(THINK if special == "<think>" else END_THINK)
        rest = rest[i + len(special):]
    return ids


# ---------------------------------------------------------------------------------------------
# persistence


def save_reasoner(model: Reasoner, tok, folder: str | Path, metrics: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "reasoner.safetensors"))
    (folder / "reasoner_tokenizer.json").write_text(tok.to_str())
    meta = {"config": asdict(model.cfg), "tasks": TASKS, "metrics": metrics or {}}
    (folder / "reasoner.json").write_text(json.dumps(meta, indent=2))
    return folder / "reasoner.safetensors"


def load_reasoner(folder: str | Path):
    """(model in eval mode, fp32, tokenizer) from what `save_reasoner` or `copy_half` wrote."""
    from tokenizers import Tokenizer

    from .storage import load_fp32_state

    folder = Path(folder)
    for name in ("reasoner.json", "reasoner.safetensors", "reasoner_tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"reasoner file not found: {folder / name}")
    cfg = ReasonerConfig(**json.loads((folder / "reasoner.json").read_text())["config"])
    model = Reasoner(cfg)
    model.load_state_dict(load_fp32_state(folder / "reasoner.safetensors"))  # fp16-stored weights come back as fp32
    return model.eval(), Tokenizer.from_file(str(folder / "reasoner_tokenizer.json"))


def copy_half(src: str | Path, dst: str | Path, dtype: str = "float16") -> Path:
    """Copy a saved reasoner with its weights stored as fp16 (half the bytes; `load_reasoner` loads
    them back into the fp32 model) and its tokenizer. `dst` may be `src` (converted in place).

    reasoner.json records the stored dtype and the SHA-256 of the FP32 source and of the copy."""
    import shutil

    from .storage import merge_record, write_half

    src, dst = Path(src), Path(dst)
    meta = json.loads((src / "reasoner.json").read_text())
    record = write_half(src / "reasoner.safetensors", dst / "reasoner.safetensors", dtype)
    if dst.resolve() != src.resolve():
        shutil.copyfile(src / "reasoner_tokenizer.json", dst / "reasoner_tokenizer.json")
    (dst / "reasoner.json").write_text(json.dumps(merge_record(meta, record), indent=2))
    return dst / "reasoner.safetensors"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


if __name__ == "__main__":
    from .storage import copy_half_main

    copy_half_main("reasoner_model", "reasoner", copy_half)
