"""Image-missing completion: predict the image token states the fusion head reads from the title alone.

    python -m sdk.train.completion --features .cache/features --catalog ../shared/data/catalog \
        --out sdk/train/weights/completion

A product without a photo is normally embedded text-only (its image presence 0). MMPCBench-style
completion fills the missing modality instead: `ImageCompletion` reads the title's token states
(the text tower's output, which the runtime computes anyway) and writes the (B, 49, d) image token
states that the frozen embedder's image encoder would have produced from the photo; the item is
then fused as title + completed image.

    title token states (B, T, 384) -> Linear + LayerNorm -> (B, T, d)
    7 learned queries (B, 7, d), n layers of: cross-attention to the title tokens,
        self-attention among the queries, FFN (pre-LN, residual)
    LayerNorm -> Linear(d, d) -> 7 tokens, each repeated 7 times -> image tokens (B, 49, d)

Why 7 distinct tokens repeated: the head reads image tokens only through softmax attention and a
mean, both unchanged when every token is repeated equally often, so 49 tokens made of 7 repeated
ones fuse exactly as the 7 would; training fuses the 7 (7x cheaper), the exported graph gives
the 49 the head expects.

Loss, per batch of training products that have a photo (the feature cache's leak-free split,
`Features.is_val`):
  pooled: MSE between the mean of the completed and of the real image tokens (what the head's
      query start reads), per channel divided by its variance (so every channel counts);
  fused: 1 - cosine between the frozen embedder's vector of (title + completed image) and of
      (title + real photo);
  contrast: in-batch InfoNCE between the (title + completed image) vectors and the frozen
      embedder's vectors of the photos alone (products sharing a title are not negatives): a
      completed item must sit where its own photo points, not only near its title;
  skip (a skip-path embedder): the photo's skip term, which the module writes from the mean of its
      queries (LayerNorm -> Linear(d, out_dim)), MSE against the real photo's per channel over its
      variance; the fused and contrast terms fuse the completed photo with it, as the runtime does.
The embedder is frozen (its image tokens are cached once per weights file, see `image_tokens`);
only the completion module trains.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..paths import COMPLETION_WEIGHTS, WEIGHTS, file_sha256
from .fusion_model import FFN, IMAGE, TEXT, Attention
from .metrics import recall_at_k


@dataclass
class CompletionConfig:
    """Architecture of the image completion module (validated on creation)."""

    d_model: int = 256  # the embedder's d_model: the completed tokens replace its image tokens
    text_dim: int = 384
    n_tokens: int = 49  # image tokens the head reads
    n_queries: int = 7  # distinct completed tokens, each repeated n_tokens // n_queries times
    n_heads: int = 4
    n_layers: int = 2
    ffn_mult: int = 2
    dropout: float = 0.1
    # the embedder's skip-path width (its out_dim) when it has one: the module also writes the photo's
    # skip term, which a completed photo would otherwise lack (0: an embedder without a skip path)
    skip_dim: int = 0

    def __post_init__(self) -> None:
        for name in ("d_model", "text_dim", "n_tokens", "n_queries", "n_heads", "n_layers", "ffn_mult"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.skip_dim, bool) or int(self.skip_dim) < 0:
            raise ValueError(f"skip_dim must be >= 0, got {self.skip_dim!r}")
        if self.n_tokens % self.n_queries:
            raise ValueError(f"n_queries ({self.n_queries}) must divide n_tokens ({self.n_tokens})")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def for_embedder(cls, embedder_cfg, **kw) -> "CompletionConfig":
        """A config whose output fits `embedder_cfg` (an `EmbedderConfig`)."""
        return cls(d_model=embedder_cfg.d_model, text_dim=embedder_cfg.text_dim,
                   n_tokens=embedder_cfg.n_image_tokens,
                   skip_dim=embedder_cfg.out_dim if getattr(embedder_cfg, "skip_path", False) else 0, **kw)


class CompletionLayer(nn.Module):
    def __init__(self, cfg: CompletionConfig):
        super().__init__()
        d = cfg.d_model
        self.cross_norm = nn.LayerNorm(d)
        self.cross = Attention(d, cfg.n_heads, cfg.dropout)
        self.self_norm = nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.ffn = FFN(d, cfg.ffn_mult, cfg.dropout)

    def forward(self, q: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # q: (B, N, d) queries; text: (B, T, d) projected title tokens; mask: (B, T)
        q = q + self.cross(self.cross_norm(q), text, mask)
        h = self.self_norm(q)
        q = q + self.self_attn(h, h, None)
        return q + self.ffn(q)


class ImageCompletion(nn.Module):
    """Title token states (B, T, text_dim) + mask (B, T) -> completed image token states (B, N, d)
    and, for a skip-path embedder (`cfg.skip_dim`), the photo's skip term (B, skip_dim)."""

    def __init__(self, cfg: CompletionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.LayerNorm(d))
        self.queries = nn.Parameter(torch.randn(1, cfg.n_queries, d) * 0.02)
        self.layers = nn.ModuleList(CompletionLayer(cfg) for _ in range(cfg.n_layers))
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        if cfg.skip_dim:
            self.skip = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.skip_dim))

    def forward(self, text_states: torch.Tensor, text_mask: torch.Tensor, repeat: bool = True) -> torch.Tensor:
        """(B, n_tokens, d) image tokens; repeat=False gives the (B, n_queries, d) distinct ones."""
        return self.complete(text_states, text_mask, repeat)[0]

    def complete(self, text_states: torch.Tensor, text_mask: torch.Tensor,
                 repeat: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image tokens as `forward` gives them, the photo's skip term (B, skip_dim) or None)."""
        text = self.text_proj(text_states)  # (B, T, d)
        q = self.queries.expand(text.shape[0], -1, -1)  # (B, K, d)
        for layer in self.layers:
            q = layer(q, text, text_mask)
        y = self.out(q)  # (B, K, d)
        skip = self.skip(q.mean(1)) if self.cfg.skip_dim else None
        return (y.repeat(1, self.cfg.n_tokens // self.cfg.n_queries, 1) if repeat else y), skip  # (B, N, d)


# ---------------------------------------------------------------------------------------------- files


def save_completion(model: ImageCompletion, folder: str | Path, embedder_sha256: str, metrics: dict | None = None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write `completion.safetensors` (weights, fp16 by default: lean) + `completion.json` (config,
    the SHA-256 of the embedder weights it was trained against, metrics)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "completion.safetensors"))
    meta = {"config": asdict(model.cfg), "embedder_sha256": embedder_sha256, "metrics": metrics or {}}
    (folder / "completion.json").write_text(json.dumps(meta, indent=2))
    return folder / "completion.safetensors"


def load_completion(folder: str | Path = COMPLETION_WEIGHTS) -> tuple[ImageCompletion, dict]:
    """(model in eval mode, float32; its completion.json as a dict). No pickle."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, w_path = folder / "completion.json", folder / "completion.safetensors"
    for p in (meta_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"completion file not found: {p}")
    meta = json.loads(meta_path.read_text())
    model = ImageCompletion(CompletionConfig(**meta["config"]))
    model.load_state_dict({k: v.float() for k, v in load_file(str(w_path)).items()})
    return model.eval(), meta


# ---------------------------------------------------------------------------------------------- data


@torch.no_grad()
def image_tokens(embedder, features, cache: str | Path, embedder_sha256: str, bs: int = 256) -> dict[str, np.ndarray]:
    """The frozen embedder's image token states of every product (and of the validation products'
    mirrored photos), cached as fp16 in `cache` (keyed by the embedder weights' SHA-256); with a
    skip path, each photo's skip term too ("skip", "flip_skip", float32)."""
    cache = Path(cache)
    names = ("tokens", "flip") + (("skip", "flip_skip") if getattr(embedder.cfg, "skip_path", False) else ())
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["embedder_sha256"]) == embedder_sha256 and set(names) <= set(z.files):
                return {k: z[k] for k in names}
    embedder.eval()

    def run(deep, shallow, desc):
        out = np.zeros((len(deep), deep.shape[1], embedder.cfg.d_model), np.float16)
        for s in tqdm(range(0, len(deep), bs), desc=desc, unit="batch"):
            out[s : s + bs] = embedder.encode_image(deep[s : s + bs].float(), shallow[s : s + bs].float()).numpy()
        return out

    def skips(deep):
        return np.concatenate([embedder.skip_image(deep[s : s + bs].float().mean(1)).numpy()
                               for s in range(0, len(deep), bs)]).astype(np.float32)

    got = {"tokens": run(features.deep, features.shallow, "image tokens"),
           "flip": run(features.deep_flip, features.shallow_flip, "image tokens (mirrored)")}
    if "skip" in names:
        got.update(skip=skips(features.deep), flip_skip=skips(features.deep_flip))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **got, embedder_sha256=np.array(embedder_sha256))
    return got


def fuse(embedder, img_tok, title, title_mask, image_present: bool = True, text_present: bool = True,
         image_skip: torch.Tensor | None = None):
    """The frozen embedder's vector of image tokens (B, N, d) (and, for a skip-path embedder, the
    photo's skip term (B, out_dim): without it the photo adds no skip term) + title states (B, T, C);
    trace absent."""
    B = title.shape[0]
    present = torch.zeros(B, 3)
    present[:, IMAGE] = float(image_present)
    present[:, TEXT] = float(text_present)
    mask = title_mask if text_present else torch.zeros_like(title_mask)
    trace, trace_mask = torch.zeros(B, 1, title.shape[-1]), torch.zeros(B, 1)
    extra = {"image_skip": image_skip} if image_skip is not None else {}
    return embedder(None, None, title, mask, trace, trace_mask, present, image_tokens=img_tok, **extra)


def fuse_completed(embedder, completion, title, title_mask) -> torch.Tensor:
    """The embedder's vector of a title with its photo completed from it (tokens and skip term)."""
    tok, skip = completion.complete(title, title_mask)
    return fuse(embedder, tok, title, title_mask, image_skip=skip)


def real_skip(tokens: dict, key: str, rows) -> torch.Tensor | None:
    """The cached skip terms (`image_tokens`' "skip" or "flip_skip") of rows, or None without a skip path."""
    return torch.from_numpy(np.asarray(tokens[key][rows], np.float32)) if key in tokens else None


def title_states(features, rows):
    """Cached title token states (B, T, C) and mask (B, T) of feature rows, cut to the longest title."""
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    tok, mask = features.title[rows].float(), features.title_mask[rows].float()
    t = int(mask.sum(1).max().clamp(min=1))
    return tok[:, :t], mask[:, :t]


# ---------------------------------------------------------------------------------------------- training


@dataclass
class CompletionTrainConfig:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    w_pooled: float = 0.5
    w_fused: float = 1.0
    w_contrast: float = 1.0
    w_skip: float = 0.5  # the photo's skip term, per channel over its variance (a skip-path embedder)
    temperature: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"epochs must be >= 1 and batch_size >= 2, got {self.epochs}, {self.batch_size}")
        if min(self.w_pooled, self.w_fused, self.w_contrast, self.w_skip) < 0:
            raise ValueError("loss weights must be >= 0")
        if not 0.0 < self.temperature < 1.0:
            raise ValueError(f"temperature must be in (0, 1), got {self.temperature}")


def completion_loss(model, embedder, title, title_mask, target, target_vec, photo_vec, same,
                    cfg: CompletionTrainConfig, inv_var: torch.Tensor,
                    skip: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch (see the module docstring) and its terms.

    target: (B, N, d) real image tokens; target_vec / photo_vec: (B, D) the frozen embedder's
    vectors of title + photo and of the photo alone; same: (B, B) products sharing a title;
    skip: for a skip-path embedder, the real photos' skip terms (B, out_dim) and their per-channel
    inverse variance.
    """
    pred, pred_skip = model.complete(title, title_mask, repeat=False)  # (B, K, d): fuses as the repeated (B, N, d)
    pooled = (((pred.mean(1) - target.mean(1)) ** 2) * inv_var).mean()
    terms = {}
    if pred_skip is not None and skip is not None:
        terms["skip"] = (((pred_skip - skip[0]) ** 2) * skip[1]).mean()
    vec = fuse(embedder, pred, title, title_mask, image_skip=pred_skip)  # (B, D)
    fused = (1.0 - (vec * target_vec).sum(-1)).mean()
    logits = (vec @ photo_vec.T) / cfg.temperature
    eye = torch.eye(len(vec), dtype=torch.bool)
    logits = logits.masked_fill(same & ~eye, -1e4)
    target_idx = torch.arange(len(vec))
    contrast = 0.5 * (F.cross_entropy(logits, target_idx) + F.cross_entropy(logits.T, target_idx))
    loss = cfg.w_pooled * pooled + cfg.w_fused * fused + cfg.w_contrast * contrast
    if "skip" in terms:
        loss = loss + cfg.w_skip * terms["skip"]
    return loss, {"pooled": pooled.item(), "fused": fused.item(), "contrast": contrast.item(),
                  **{k: v.item() for k, v in terms.items()}}


@torch.no_grad()
def evaluate(model, embedder, features, tokens: dict, rows: np.ndarray, keys: np.ndarray, bs: int = 256) -> dict:
    """On `rows` (validation products with a photo): mean cosine of (title + completed image) to
    (title + photo), and R@10 of mirrored-photo queries against galleries of title + completed
    image vs. title alone (a hit shares the query's title)."""
    model.eval()
    pos = {int(r): i for i, r in enumerate(features.flip_rows)}
    real, comp, text_only, photo_q = [], [], [], []
    for s in range(0, len(rows), bs):
        r = rows[s : s + bs]
        title, mask = title_states(features, r)
        tok = torch.from_numpy(tokens["tokens"][r]).float()
        f = [pos[int(i)] for i in r]
        flip = torch.from_numpy(tokens["flip"][f]).float()
        real.append(fuse(embedder, tok, title, mask, image_skip=real_skip(tokens, "skip", r)))
        comp.append(fuse_completed(embedder, model, title, mask))
        text_only.append(fuse(embedder, tok, title, mask, image_present=False))
        photo_q.append(fuse(embedder, flip, title, mask, text_present=False, image_skip=real_skip(tokens, "flip_skip", f)))
    real, comp, text_only, photo_q = (torch.cat(x) for x in (real, comp, text_only, photo_q))
    k = keys[rows]

    def r10(q, g):
        return recall_at_k(q, g, k, k, ks=(10,))["R@10"]

    return {"cos(completed, real) mean": float((comp * real).sum(-1).mean()),
            "cos(text-only, real) mean": float((text_only * real).sum(-1).mean()),
            "image->completed R@10": r10(photo_q, comp), "image->text-only R@10": r10(photo_q, text_only),
            "image->real R@10": r10(photo_q, real)}


def train(features, embedder, tokens: dict, keys: np.ndarray, ccfg: CompletionConfig, cfg: CompletionTrainConfig,
          log=print) -> tuple[ImageCompletion, dict]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    for p in embedder.parameters():
        p.requires_grad_(False)
    embedder.eval()
    has = features.has_image.numpy().astype(bool)
    val = features.is_val
    train_rows, val_rows = np.flatnonzero(has & ~val), np.flatnonzero(has & val)
    # per-channel variance of the real pooled tokens (training rows, a sample) for the pooled loss
    sample = tokens["tokens"][rng.choice(train_rows, size=min(2000, len(train_rows)), replace=False)].astype(np.float32)
    inv_var = torch.from_numpy(1.0 / (sample.mean(1).var(0) + 1e-6))
    skip_inv_var = (torch.from_numpy(1.0 / (tokens["skip"][train_rows].var(0) + 1e-6)).float()
                    if "skip" in tokens else None)
    model = ImageCompletion(ccfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_rows) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                              * 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
    history, t0 = [], time.time()
    bar = tqdm(total=total, desc="completion", unit="step")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(train_rows)
        sums: dict[str, float] = {}
        for b in range(steps_per_epoch):
            r = np.sort(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            title, mask = title_states(features, r)
            target, target_skip = torch.from_numpy(tokens["tokens"][r]).float(), real_skip(tokens, "skip", r)
            with torch.no_grad():
                target_vec = fuse(embedder, target, title, mask, image_skip=target_skip)
                photo_vec = fuse(embedder, target, title, mask, text_present=False, image_skip=target_skip)
            same = torch.from_numpy(keys[r][:, None] == keys[r][None, :])
            loss, terms = completion_loss(model, embedder, title, mask, target, target_vec, photo_vec, same, cfg,
                                          inv_var, None if target_skip is None else (target_skip, skip_inv_var))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / steps_per_epoch
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = evaluate(model, embedder, features, tokens, val_rows, keys)
        history.append({"epoch": epoch, **{k: round(v, 4) for k, v in sums.items()},
                        **{k: round(v, 4) for k, v in metrics.items()}})
        log(json.dumps(history[-1]))
    bar.close()
    report = {"history": history, "final": history[-1], "train_rows": int(len(train_rows)),
              "val_rows": int(len(val_rows)), "seconds": round(time.time() - t0, 1),
              "params": int(sum(p.numel() for p in model.parameters())), "train_config": asdict(cfg)}
    return model.eval(), report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default=".cache/features", help="feature cache of sdk.train.features")
    ap.add_argument("--catalog", required=True, help="the catalog the features came from (titles: hit keys)")
    ap.add_argument("--embedder", default=str(WEIGHTS), help="folder of the frozen embedder weights")
    ap.add_argument("--tokens-cache", default="runs/completion/image_tokens.npz",
                    help="where the embedder's image tokens are cached")
    ap.add_argument("--out", default=str(COMPLETION_WEIGHTS))
    ap.add_argument("--epochs", type=int, default=CompletionTrainConfig.epochs)
    ap.add_argument("--layers", type=int, default=CompletionConfig.n_layers)
    ap.add_argument("--queries", type=int, default=CompletionConfig.n_queries,
                    help="distinct completed tokens (a divisor of the 49 image tokens; 1 = one pooled vector)")
    ap.add_argument("--w-pooled", type=float, default=CompletionTrainConfig.w_pooled)
    ap.add_argument("--w-fused", type=float, default=CompletionTrainConfig.w_fused)
    ap.add_argument("--w-contrast", type=float, default=CompletionTrainConfig.w_contrast)
    ap.add_argument("--w-skip", type=float, default=CompletionTrainConfig.w_skip,
                    help="weight of the photo's skip term (an embedder with a skip path)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from .feature_cache import Features, title_keys
    from .fusion_model import load_embedder

    torch.set_num_threads(1)
    embedder = load_embedder(args.embedder)
    sha = file_sha256(Path(args.embedder) / "embedder.safetensors")
    features = Features(args.features)
    tokens = image_tokens(embedder, features, args.tokens_cache, sha)
    keys = title_keys(features, args.catalog)
    ccfg = CompletionConfig.for_embedder(embedder.cfg, n_layers=args.layers, n_queries=args.queries)
    cfg = CompletionTrainConfig(epochs=args.epochs, w_pooled=args.w_pooled, w_fused=args.w_fused,
                                w_contrast=args.w_contrast, w_skip=args.w_skip, seed=args.seed)
    model, report = train(features, embedder, tokens, keys, ccfg, cfg)
    out = save_completion(model, args.out, sha, metrics=report["final"])
    report_path = Path(args.out) / "completion_report.json"
    report_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {report_path} in {report['seconds']} s")


if __name__ == "__main__":
    main()
