"""GRPO on the reasoner's query-side traces with a retrieval reward (MOON3.0-style RL after SFT).

    python -m sdk.train.traces --catalog ../shared/data/catalog --out .cache/traces
    python -m research.grpo --catalog ../shared/data/catalog --features .cache/features \
        --traces .cache/traces --out runs/reasoner_grpo

For a batch of training products, the SFT reasoner (the policy, initialised from the committed
weights) samples G traces per product from the title alone (the text-query side). Each trace is
rewarded by how well the embedding it conditions on retrieves its product:

    reward = cos(q, positive) - max cos(q, hardest negative)          (retrieval margin)
             + format_weight * [<think> ... </think> summary well formed]
             - length_weight * tokens

where q = embedder(title + trace), the positive is the product's catalog-side vector (photo +
the photo trace written by the SFT reasoner) and negatives are other products' catalog vectors
(products sharing the title excluded). Advantages are normalised within each product's group of
G; the loss is the policy gradient with those advantages plus beta * KL(policy || SFT reasoner)
(the k3 estimator, per token). `--eval` then rewrites validation traces greedily and reports
text->image R@10 with SFT traces vs GRPO traces, with the same embedder and gallery.

Only the reasoner is updated. The embedder (trained with traces beforehand by
`train_embedder --traces`, on the SFT reasoner's cached traces of all three views) is frozen:
it embeds the queries under `torch.no_grad`, and the catalog-side vectors are computed once,
from the SFT reasoner's photo traces, before the first step. MOON3.0 trains the embedder's
contrastive loss and the GRPO reward jointly; that joint update is not done here. The reason is
the CPU budget: the trace embedder is trained separately, once, on cached traces, and a
joint update would back-propagate through the embedder and re-embed the gallery every step, on
top of a GRPO run that already takes 7-10 min on 2 cores. So the reward is a fixed function of
the trace, and the embedder never adapts to the GRPO traces.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdk.paths import REASONER_WEIGHTS, WEIGHTS
from sdk.train.catalog import read_catalog
from sdk.train.reasoner_model import END_THINK, EOS, PAD, TASKS, THINK, decode, encode_example, load_reasoner, save_reasoner
from sdk.train.traces import token_rows


@dataclass
class GRPOConfig:
    steps: int = 60
    products_per_step: int = 8
    group: int = 4  # G samples per product
    temperature: float = 1.0
    max_new_tokens: int = 80
    lr: float = 1e-5
    beta: float = 0.05  # KL weight
    format_weight: float = 0.2
    length_weight: float = 0.002
    negatives: int = 512  # gallery products drawn as negatives per step
    seed: int = 0


@torch.no_grad()
def sample(model, prompt: list[int], n: int, max_new_tokens: int, temperature: float,
           gen: torch.Generator) -> tuple[list[list[int]], list[bool]]:
    """n sampled continuations of one prompt (no photo), and whether each ended with <eos>
    (the others ran out of budget)."""
    budget = min(max_new_tokens, model.cfg.max_len - len(prompt))
    step, past = torch.tensor([prompt] * n), None
    out = torch.full((n, budget), PAD, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    lengths = torch.full((n,), budget)
    for t in range(budget):
        logits, past = model(step, past=past)
        probs = (logits[:, -1] / temperature).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        lengths = torch.where(~done & (nxt == EOS), torch.full_like(lengths, t), lengths)
        done |= nxt == EOS
        out[:, t] = torch.where(done, torch.full_like(nxt, PAD), nxt)
        if bool(done.all()):
            break
        step = nxt[:, None]
    return token_rows(out, lengths), done.tolist()


def token_logprobs(model, prompt: list[int], conts: list[list[int]], ended: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T) log-probabilities of each continuation's tokens (and its <eos> when it ended), and their mask."""
    seqs = [prompt + c + ([EOS] if e else []) for c, e in zip(conts, ended)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    logits, _ = model(ids[:, :-1])  # causal: right padding never reaches the real positions
    lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (n, T-1)
    pos = torch.arange(T - 1)[None, :]
    start = len(prompt) - 1
    ends = torch.tensor([len(s) - 1 for s in seqs])[:, None]
    mask = ((pos >= start) & (pos < ends)).float()
    return lp, mask


def well_formed(ids: list[int]) -> bool:
    if THINK not in ids or END_THINK not in ids:
        return False
    a, b = ids.index(THINK), ids.index(END_THINK)
    return a == 0 and b > a + 1 and len(ids) > b + 1


def shaping(conts: list[list[int]], cfg: GRPOConfig) -> torch.Tensor:
    """Format reward minus length penalty, per continuation:
    cfg.format_weight * well_formed(c) - cfg.length_weight * len(c) (tokens, <eos> not counted)."""
    form = torch.tensor([float(well_formed(c)) for c in conts])
    return cfg.format_weight * form - cfg.length_weight * torch.tensor([float(len(c)) for c in conts])


def retrieval_margin(q: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, negative_keys: np.ndarray,
                     key) -> torch.Tensor:
    """The retrieval part of the reward: how far each query beats the hardest negative.

    margin_i = cos(q_i, positive) - max_j cos(q_i, negatives_j) over the negatives whose title key
    differs from `key` (a product sharing the title is a hit, not a negative). The vectors are the
    embedder's, L2-normalised, so dot products are cosines. If every negative shares the title, the
    max is over nothing and counts as -2 (below any cosine).

    Args:
        q: (G, D) query vectors (title + one sampled trace each).
        positive: (D,) the product's own catalog-side vector.
        negatives: (K, D) other products' catalog-side vectors.
        negative_keys: (K,) title keys of the negatives.
        key: the product's title key.

    Returns:
        (G,) margins.
    """
    keep = torch.from_numpy(np.asarray(negative_keys) != key)  # (K,)
    neg = (q @ negatives.T).masked_fill(~keep[None, :], -2.0)  # (G, K)
    return q @ positive - neg.max(1).values


def group_advantages(reward: torch.Tensor) -> torch.Tensor:
    """GRPO advantages of one group of samples: (reward - mean) / (std + 1e-4).

    Zero-mean within the group; unit (unbiased) std up to the 1e-4 guard, and all zeros when every
    sample got the same reward (no signal, no update).
    """
    return (reward - reward.mean()) / (reward.std() + 1e-4)


def grpo_step(policy, ref, opt, prompts: dict, reward_fn, cfg: GRPOConfig, gen: torch.Generator) -> dict:
    """One GRPO update: G samples per prompt, group-normalised advantages, KL to `ref`.

    prompts: {key: token ids}; reward_fn(key, continuations) -> (G,) rewards.
    """
    opt.zero_grad(set_to_none=True)
    rewards, lens, kls, fmt = [], [], [], []
    for key, prompt in prompts.items():
        policy.eval()
        conts, ended = sample(policy, prompt, cfg.group, cfg.max_new_tokens, cfg.temperature, gen)
        policy.train()
        reward = reward_fn(key, conts)
        adv = group_advantages(reward)
        lp, mask = token_logprobs(policy, prompt, conts, ended)
        with torch.no_grad():
            ref_lp, _ = token_logprobs(ref, prompt, conts, ended)
        d = ref_lp - lp
        kl = (d.exp() - d - 1) * mask  # k3 estimator of KL(policy || ref), per token
        n_tok = mask.sum(1).clamp(min=1)
        per_seq = ((-adv[:, None] * lp + cfg.beta * kl) * mask).sum(1) / n_tok
        (per_seq.mean() / len(prompts)).backward()
        rewards.append(float(reward.mean()))
        lens.append(float(np.mean([len(c) for c in conts])))
        fmt.append(float(np.mean([well_formed(c) for c in conts])))
        kls.append(float((kl.sum(1) / n_tok).mean().detach()))
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return {"reward": round(float(np.mean(rewards)), 4), "format": round(float(np.mean(fmt)), 3),
            "tokens": round(float(np.mean(lens)), 1), "kl": round(float(np.mean(kls)), 4)}


class TraceScorer:
    """Embeds title + trace with the frozen embedder and scores retrieval against a gallery."""

    def __init__(self, embedder, features, text_model, text_tok):
        self.model, self.f, self.text_model, self.text_tok = embedder.eval(), features, text_model, text_tok

    @torch.no_grad()
    def embed(self, rows: list[int], traces: list[str], batch: int = 128) -> torch.Tensor:
        if len(rows) > batch:
            return torch.cat([self.embed(rows[s : s + batch], traces[s : s + batch]) for s in range(0, len(rows), batch)])
        from sdk.train.fusion_model import TEXT, TRACE

        ids, m = self.text_tok(traces)
        tr = self.text_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(m)).last_hidden_state
        r = torch.tensor(rows)
        tok, mask = self.f.title[r].float(), self.f.title_mask[r].float()
        B = len(rows)
        present = torch.zeros(B, 3)
        present[:, TEXT] = 1.0
        present[:, TRACE] = 1.0
        deep = torch.zeros(B, *self.f.deep.shape[1:])
        shallow = torch.zeros(B, *self.f.shallow.shape[1:])
        return self.model(deep, shallow, tok, mask, tr, torch.from_numpy(m).float(), present)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--features", default=".cache/features")
    ap.add_argument("--traces", default=".cache/traces")
    ap.add_argument("--reasoner", default=str(REASONER_WEIGHTS))
    ap.add_argument("--embedder", default=str(WEIGHTS))
    ap.add_argument("--out", default="runs/reasoner_grpo")
    ap.add_argument("--steps", type=int, default=GRPOConfig.steps)
    ap.add_argument("--eval", action="store_true", help="afterwards compare validation R@10 with SFT vs GRPO traces")
    args = ap.parse_args(argv)

    from sdk.preprocess import TextTokenizer
    from sdk.train.feature_cache import Features, embed_rows, title_keys
    from sdk.train.features import TRACE_LEN
    from sdk.train.fusion_model import load_embedder
    from sdk.train.metrics import recall_at_k
    from sdk.train.towers import load_text_tower, text_tower_path

    cfg = GRPOConfig(steps=args.steps)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    f = Features(args.features)
    f.load_traces(args.traces, views=("photo", "title"))
    keys = title_keys(f, args.catalog)
    titles = {p.id: p.title for p in read_catalog(args.catalog)}
    embedder = load_embedder(args.embedder)
    scorer = TraceScorer(embedder, f, load_text_tower(), TextTokenizer(text_tower_path() / "tokenizer.json", TRACE_LEN))
    has = f.has_image.numpy().astype(bool)
    is_val = f.is_val
    train_rows = np.flatnonzero(~is_val & has)
    gallery = embed_rows(embedder, f, train_rows, image=True, text=None, trace="photo")  # catalog side, SFT traces
    where = {int(r): i for i, r in enumerate(train_rows)}

    policy, tok = load_reasoner(args.reasoner)
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    policy.train()
    for m in policy.modules():  # no dropout: the sampled tokens' log-probs must be the policy's
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    prompt_of = {int(r): encode_example(tok, TASKS["trace"], None, titles[int(f.ids[r])])[0] for r in train_rows}
    stats: dict = {}

    def reward_fn(r: int, conts: list[list[int]]) -> torch.Tensor:
        q = scorer.embed([r] * len(conts), [decode(tok, c) for c in conts])  # (G, D)
        margin = retrieval_margin(q, gallery[where[r]], gallery[neg_idx], keys[train_rows[neg_idx.numpy()]], keys[r])
        stats.setdefault("margin", []).append(float(margin.mean()))
        return margin + shaping(conts, cfg)

    history = []
    bar = tqdm(range(cfg.steps), desc="grpo", unit="step")
    for step in bar:
        rows = rng.choice(train_rows, size=cfg.products_per_step, replace=False)
        neg_idx = torch.from_numpy(rng.choice(len(train_rows), size=cfg.negatives, replace=False))
        stats.clear()
        rec = grpo_step(policy, ref, opt, {int(r): prompt_of[int(r)] for r in rows}, reward_fn, cfg, gen)
        rec = {"step": step + 1, **rec, "margin": round(float(np.mean(stats["margin"])), 4)}
        history.append(rec)
        bar.set_postfix(reward=rec["reward"], margin=rec["margin"], kl=rec["kl"])
    bar.close()
    policy.eval()
    result: dict = {"config": asdict(cfg), "history": history, "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    save_reasoner(policy, tok, out, metrics={"grpo": result})

    if args.eval:
        from sdk.train.traces import catalog_traces

        val_rows = np.flatnonzero(is_val & has)
        k = keys[val_rows]
        g = embed_rows(embedder, f, val_rows, image=True, text=None, trace="photo")
        sft = embed_rows(embedder, f, val_rows, image=False, text="title", trace="title")
        vt = [titles[int(f.ids[r])] for r in val_rows]
        texts, counts, _ = catalog_traces(policy, tok, vt, None, np.zeros(len(val_rows), bool), "title",
                                          desc="validation traces, GRPO policy")
        grpo = scorer.embed([int(r) for r in val_rows], texts)
        no_trace = embed_rows(embedder, f, val_rows, image=False, text="title")
        result["validation"] = {
            "text->image R@10, query without trace": recall_at_k(no_trace, g, k, k)["R@10"],
            "text->image R@10, SFT query traces": recall_at_k(sft, g, k, k)["R@10"],
            "text->image R@10, GRPO query traces": recall_at_k(grpo, g, k, k)["R@10"],
            "GRPO trace tokens (mean)": float(np.mean(counts)),
            "GRPO traces well formed": float(np.mean([t.startswith("<think>") and "</think>" in t for t in texts])),
            "example": texts[0],
        }
        print(json.dumps(result["validation"], indent=2))
    (out / "grpo.json").write_text(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
