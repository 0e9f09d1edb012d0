"""TTE_u: an embedding head on the reasoner's own hidden states, so one generation gives both the
reasoning trace and the vector (Think-Then-Embed, unified variant), compared with the two-model
path (the reasoner writes the trace, the embedder reads photo, title and trace).

    python -m sdk.train.traces --catalog ../shared/data/catalog --out .cache/traces
    python -m research.tte --features .cache/features --traces .cache/traces \
        --catalog ../shared/data/catalog --out sdk/train/weights/tte

The head reads one layer of the reasoner's hidden states, mean-pooled over the prompt and the
trace it wrote (`sdk.train.traces` stores them per view), and maps it into the embedder's space:
LayerNorm -> Linear -> GELU -> Linear -> L2. It is trained on the training products against the
embedder's trace-on vectors of the same view (cosine distillation plus in-batch InfoNCE, so the
relations between products survive), for every candidate layer; the layer is chosen on a slice
of the training products held out from the head's training, then measured on the validation
products (ids ending in 0) with the embedder model card's retrieval protocol.
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

from sdk.paths import WEIGHTS
from sdk.train.metrics import recall_at_k

VIEWS = ("title", "photo", "photo+title")


@dataclass
class TTEConfig:
    d_in: int = 256
    d_hidden: int = 512
    d_out: int = 256
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    temperature: float = 0.05
    seed: int = 0


class TTEHead(nn.Module):
    def __init__(self, cfg: TTEConfig):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(cfg.d_in), nn.Linear(cfg.d_in, cfg.d_hidden), nn.GELU(),
                                 nn.Linear(cfg.d_hidden, cfg.d_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h), dim=-1)


def train_head(cfg: TTEConfig, inputs: dict[str, np.ndarray], targets: dict[str, np.ndarray], rows: np.ndarray,
               same: np.ndarray | None = None, desc: str = "tte") -> TTEHead:
    """Fit one head on `rows` of every view: inputs[view] (N, d_in) -> targets[view] (N, d_out).

    same: optional (N,) group key; rows of one group are not each other's negatives.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    head = TTEHead(cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, len(rows) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    x = {v: torch.from_numpy(np.asarray(inputs[v], np.float32)) for v in inputs}
    y = {v: torch.from_numpy(np.asarray(targets[v], np.float32)) for v in targets}
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
    for _ in range(cfg.epochs):
        order = rng.permutation(rows)
        for s in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            b = torch.from_numpy(order[s : s + cfg.batch_size])
            block = None
            if same is not None:
                key = torch.from_numpy(same[b.numpy()])
                block = (key[:, None] == key[None, :]) & ~torch.eye(len(b), dtype=torch.bool)
            loss = 0.0
            for v in x:
                q, t = head(x[v][b]), y[v][b]
                logits = q @ t.T / cfg.temperature
                if block is not None:
                    logits = logits.masked_fill(block, -1e4)
                loss = loss + F.cross_entropy(logits, torch.arange(len(b))) + (1 - (q * t).sum(-1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return head.eval()


# The held-out score that picks the layer: retrieval with the head on both sides, the TTE_u case
# the head exists for (the other rows lean on the embedder's gallery).
SELECT_BY = "text->image R@10 (TTE_u both sides)"


def scores(head: TTEHead, hidden: dict[str, np.ndarray], emb: dict[str, np.ndarray], keys: np.ndarray,
           rows: np.ndarray) -> dict[str, float]:
    """Retrieval of the head's vectors on `rows` (the embedder model card's protocol).

    Args:
        head: a trained (or any) head.
        hidden: {view: (N, d_in)} one layer's pooled hidden states per view in `VIEWS`.
        emb: {view: (N, d_out)} the embedder's trace-on vectors of the same views (the gallery and
            the distillation target).
        keys: (N,) title keys; a hit is a gallery item with the query's key.
        rows: the rows to score, query and gallery alike.

    Returns:
        R@10 of the TTE_u vector against the embedder's gallery and against itself, and the mean
        cosine to the embedder's title-view vector.
    """
    v = {view: head(torch.from_numpy(hidden[view][rows])).detach().numpy() for view in VIEWS}
    k = keys[rows]

    def r10(q, g):
        return recall_at_k(q, g, k, k, ks=(10,))["R@10"]

    return {
        "text->image R@10 (TTE_u query, embedder gallery)": r10(v["title"], emb["photo"][rows]),
        "text->image R@10 (TTE_u both sides)": r10(v["title"], v["photo"]),
        "image->text R@10 (TTE_u both sides)": r10(v["photo"], v["title"]),
        "mm->mm R@10 (TTE_u query, embedder gallery)": r10(v["photo+title"], emb["photo"][rows]),
        "cosine to the embedder's vector (title view)": float((v["title"] * emb["title"][rows]).sum(1).mean()),
    }


def choose_layer(cfg: TTEConfig, hidden: dict[str, np.ndarray], emb: dict[str, np.ndarray], keys: np.ndarray,
                 fit_rows: np.ndarray, held_rows: np.ndarray, layers, log=print) -> tuple[int, TTEHead, dict]:
    """Train one head per candidate layer on `fit_rows` and keep the best on `held_rows` by `SELECT_BY`.

    Args:
        cfg: head and training config.
        hidden: {view: (N, L + 1, d_in)} pooled hidden states of every layer (0 = embeddings).
        emb: {view: (N, d_out)} targets, as in `scores`.
        keys: (N,) title keys: the negatives' mask in training and the hits in scoring.
        fit_rows: rows the heads are trained on.
        held_rows: rows (disjoint from fit_rows) the layer is chosen on.
        layers: candidate layer indices, tried in order; ties keep the earlier one.
        log: called with one JSON line per layer.

    Returns:
        (chosen layer, its head, {layer: rounded held-out scores}).
    """
    per_layer: dict[int, dict] = {}
    best, best_score, best_head = None, -1.0, None
    for layer in layers:
        x = {v: hidden[v][:, layer] for v in VIEWS}
        head = train_head(cfg, x, emb, fit_rows, keys, desc=f"tte layer {layer}")
        with torch.no_grad():
            s = scores(head, x, emb, keys, held_rows)
        per_layer[layer] = {k: round(v, 4) for k, v in s.items()}
        log(json.dumps({"layer": layer, **per_layer[layer]}))
        if s[SELECT_BY] > best_score:
            best, best_score, best_head = layer, s[SELECT_BY], head
    return best, best_head, per_layer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default=".cache/features")
    ap.add_argument("--traces", default=".cache/traces")
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--embedder", default=str(WEIGHTS), help="trace-trained embedder folder")
    ap.add_argument("--out", default=None, help="folder for tte.safetensors + tte.json")
    ap.add_argument("--epochs", type=int, default=TTEConfig.epochs)
    args = ap.parse_args(argv)

    from sdk.train.feature_cache import Features, embed_rows, title_keys
    from sdk.train.fusion_model import load_embedder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    f = Features(args.features)
    f.load_traces(args.traces)
    keys = title_keys(f, args.catalog)
    model = load_embedder(args.embedder)
    if not json.loads((Path(args.embedder) / "embedder.json").read_text())["metrics"].get("trace_trained"):
        raise SystemExit(f"{args.embedder}: the embedder was not trained with traces (train it with --traces)")
    n = len(f)
    all_rows = np.arange(n)
    has = f.has_image.numpy().astype(bool)
    # the embedder's trace-on vectors of each view: the targets and the two-model path
    emb = {
        "title": embed_rows(model, f, all_rows, image=False, text="title", trace="title").numpy(),
        "photo": np.zeros((n, 256), np.float32),
        "photo+title": embed_rows(model, f, all_rows, image=True, text="title", trace="photo+title").numpy(),
    }
    emb["photo"][has] = embed_rows(model, f, all_rows[has], image=True, text=None, trace="photo").numpy()
    hidden = {v: np.load(Path(args.traces) / f"{v}_hidden.npy") for v in VIEWS}
    n_layers = hidden["title"].shape[1] - 1

    is_val = f.is_val
    rng = np.random.default_rng(0)
    train_rows = np.flatnonzero(~is_val & has)
    held = rng.choice(train_rows, size=len(train_rows) // 10, replace=False)
    fit_rows = np.setdiff1d(train_rows, held)
    val_rows = np.flatnonzero(is_val & has)
    cfg = TTEConfig(epochs=args.epochs, d_in=hidden["title"].shape[2], d_out=emb["title"].shape[1])

    layer, best_head, per_layer = choose_layer(cfg, hidden, emb, keys, fit_rows, held, range(1, n_layers + 1))
    with torch.no_grad():
        val = scores(best_head, {v: hidden[v][:, layer] for v in VIEWS}, emb, keys, val_rows)
    k = keys[val_rows]
    two_model = {
        "text->image R@10 (two models, trace on)": recall_at_k(emb["title"][val_rows], emb["photo"][val_rows], k, k,
                                                               ks=(10,))["R@10"],
        "image->text R@10 (two models, trace on)": recall_at_k(emb["photo"][val_rows], emb["title"][val_rows], k, k,
                                                               ks=(10,))["R@10"],
    }
    result = {"layer": layer, "validation": {**{k2: round(x, 4) for k2, x in val.items()},
                                             **{k2: round(x, 4) for k2, x in two_model.items()}},
              "held_out_by_layer": per_layer, "config": asdict(cfg), "fit_items": int(len(fit_rows)),
              "val_items": int(len(val_rows)), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(result["validation"], indent=2))
    if args.out:
        from safetensors.torch import save_file

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k2: v.contiguous() for k2, v in best_head.state_dict().items()}, str(out / "tte.safetensors"))
        (out / "tte.json").write_text(json.dumps(result, indent=2))
        print(f"saved {out}")


if __name__ == "__main__":
    main()
