"""Reasoning traces of a whole catalog, written by the trained reasoner, for the trace modality.

    python -m sdk.train.traces --catalog ../shared/data/catalog --features .cache/features \
        --reasoner sdk/train/weights/reasoner --out .cache/traces

Think-Then-Embed: the reasoner writes a trace for each side of a retrieval (the query side from
what the query has, the catalog side once, offline), and the embedder fuses it as a third
modality. This module writes, per product and per *view* (what the reasoner was shown):

    photo+title   catalog side: the photo and the title
    title         a text query: the title alone
    photo         a photo query or a product without a title: the photo alone

Each view gives `<view>.jsonl` (id, trace text, token count), `<view>_hidden.npy` (N, L+1, d):
the reasoner's hidden states after the embedding and after each decoder layer, mean-pooled
over the prompt and the trace (for TTE_u heads that embed from the reasoner itself; taken from
the generating passes, so they cost one extra step), then the MiniLM
token states of the traces, `<view>_tok.npy` (N, T, 384) fp16 + `<view>_mask.npy`, exactly what
the embedder's trace modality reads at run time (the engine's trace tokenizer and budget).

Generation is greedy (the runtime's decoding), batched: prompts of one token length decode
together with a shared KV cache, so the torch model writes thousands of traces in minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..paths import REASONER_WEIGHTS
from .catalog import read_catalog
from .features import TRACE_LEN
from .reasoner_model import EOS, PAD, TASKS, decode, encode_example, load_reasoner, trace_target

VIEWS = {"photo+title": (True, True), "title": (False, True), "photo": (True, False)}
ORACLE = "oracle"  # not generated: the SFT target built from the catalog's own fields (an upper bound)


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], deep: torch.Tensor | None, max_new_tokens: int,
                   pooled: np.ndarray | None = None) -> list[list[int]]:
    """Greedy continuation of equal-length prompts (B, T) with one KV cache; stops each row at <eos>.

    deep: (B, 49, 1280) photo features with zeros for rows without a photo, or None for no photo.
    Equal to `Reasoner.generate` row by row (the rows never attend to each other).
    pooled: optional (B, L+1, d) array, filled with each row's hidden states after the embedding
    and after every decoder layer, averaged over the positions the model read while writing
    (the prompt and the trace tokens fed back), from the same forward passes.
    """
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"generate_batch needs prompts of one length, got lengths {sorted(lengths)}")
    B, P = len(prompts), lengths.pop()
    vmask = vkv = None
    if deep is not None:
        vmask = (deep.abs().sum((1, 2)) > 0).float()
        vkv = model.visual(deep)
    budget = min(max_new_tokens, model.cfg.max_len - P)
    out = torch.full((B, max(budget, 0)), PAD, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    lengths = torch.full((B,), max(budget, 0))
    sums = torch.zeros(B, model.cfg.n_layers + 1, model.cfg.d_model)
    seen = torch.zeros(B)
    states: list[torch.Tensor] = []
    hooks = [] if pooled is None else [
        m.register_forward_hook(lambda _m, _i, o: states.append(o if isinstance(o, torch.Tensor) else o[0]))
        for m in (model.embed, *model.layers)]
    try:
        step, past, live, start = torch.tensor(prompts), None, torch.ones(B), 0
        for t in range(budget + 1):
            if t == budget:  # read the last token too, for the pooled states only
                if pooled is None or not live.any():
                    break
                model(step, visual_mask=vmask, past=past, visual_kv=vkv)
            else:
                logits, past = model(step, visual_mask=vmask, past=past, visual_kv=vkv)
            if pooled is not None:
                pos = model.pos(torch.arange(start, start + step.shape[1]))
                states[0] = states[0] + pos  # the embedding hook sees token embeddings only
                sums += torch.stack([h.sum(1) for h in states], 1) * live[:, None, None]
                seen += step.shape[1] * live
                states.clear()
            if t == budget:
                break
            start += step.shape[1]
            nxt = logits[:, -1].argmax(-1)
            lengths = torch.where(~done & (nxt == EOS), torch.full_like(lengths, t), lengths)
            done |= nxt == EOS
            out[:, t] = torch.where(done, torch.full_like(nxt, PAD), nxt)
            live = (~done).float()
            if bool(done.all()):
                break
            step = nxt[:, None]
    finally:
        for h in hooks:
            h.remove()
    if pooled is not None:
        pooled[:] = (sums / seen[:, None, None]).numpy()
    return token_rows(out, lengths)


def token_rows(out: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Each row's first `lengths[i]` generated token ids."""
    return [out[i, : int(n)].tolist() for i, n in enumerate(lengths)]


@torch.inference_mode()
def pooled_hidden(model, seqs: list[list[int]], deep: torch.Tensor | None) -> np.ndarray:
    """(B, L+1, d) as `generate_batch(..., pooled=)` gives, from one fresh pass over finished sequences.

    Sequences are right-padded; causal attention keeps padding out of the real positions.
    """
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    mask = (torch.arange(T)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).float()[..., None]
    states: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: states.append(o[0])) for layer in model.layers]
    try:
        vmask = None if deep is None else (deep.abs().sum((1, 2)) > 0).float()
        model(ids, deep=deep, visual_mask=vmask)
    finally:
        for h in hooks:
            h.remove()
    x0 = model.embed(ids) + model.pos(torch.arange(T))
    return torch.stack([(h * mask).sum(1) / mask.sum(1) for h in [x0, *states]], 1).numpy()


def catalog_traces(model, tok, titles: list[str], deep: np.ndarray | None, has_image: np.ndarray, view: str,
                   batch: int = 64, max_new_tokens: int = 96, desc: str = "") -> tuple[list[str], list[int], np.ndarray]:
    """Traces (text, token count) and pooled hidden states for every row, in row order."""
    use_photo, use_title = VIEWS[view]
    n = len(titles)
    prompts = [encode_example(tok, TASKS["trace"], None, titles[i] if use_title else None)[0] for i in range(n)]
    texts, counts = [""] * n, [0] * n
    hidden = np.zeros((n, model.cfg.n_layers + 1, model.cfg.d_model), np.float32)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    chunks = [rows[s : s + batch] for rows in by_len.values() for s in range(0, len(rows), batch)]
    bar = tqdm(total=n, desc=desc or f"traces {view}", unit="item")
    for rows in chunks:
        d = None
        if use_photo:
            d = (torch.from_numpy(np.asarray(deep[rows], np.float32))
                 * torch.from_numpy(has_image[rows].astype(np.float32))[:, None, None])
        pooled = np.zeros((len(rows), *hidden.shape[1:]), np.float32)
        gen = generate_batch(model, [prompts[i] for i in rows], d, max_new_tokens, pooled)
        hidden[rows] = pooled
        for i, g in zip(rows, gen):
            texts[i], counts[i] = decode(tok, g), len(g)
        bar.update(len(rows))
    bar.close()
    return texts, counts, hidden


SCORED_FIELDS = (("article type", "article_type"), ("colour", "base_colour"), ("gender", "gender"))


def field_accuracy(texts: list[str], records: list[dict]) -> dict[str, float]:
    """Share of traces that state each of `SCORED_FIELDS` as the catalog record has it."""
    import re

    out = {}
    for name, key in SCORED_FIELDS:
        pat = re.compile(rf"the {name} is ([^;<]+)")
        hits = [bool((m := pat.search(t)) and m.group(1).strip().lower() == str(r.get(key) or "").strip().lower())
                for t, r in zip(texts, records)]
        out[name] = round(float(np.mean(hits)), 4) if hits else float("nan")
    return out


def score(folder: Path, catalog: str) -> dict:
    """Field accuracy of every cached view, training and validation products apart."""
    from .catalog import catalog_split

    split = catalog_split(catalog)
    products = {p.id: p for p in read_catalog(catalog)}
    result = {}
    for path in sorted(folder.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for part, keep in (("train", False), ("validation", True)):
            sel = [r for r in rows if split.is_validation(r["id"]) == keep]
            result[f"{path.stem} {part}"] = field_accuracy([r["trace"] for r in sel],
                                                            [products[r["id"]].record for r in sel])
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--features", default=".cache/features", help="feature cache (img_deep.npy, has_image.npy)")
    ap.add_argument("--reasoner", default=str(REASONER_WEIGHTS))
    ap.add_argument("--out", default=".cache/traces")
    ap.add_argument("--views", nargs="+", choices=(*VIEWS, ORACLE), default=list(VIEWS),
                    help=f"what the reasoner is shown; {ORACLE!r} writes the catalog fields' own trace instead")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="only the first N products (smoke runs)")
    ap.add_argument("--score", action="store_true",
                    help="only measure how often the cached traces state the record's fields right (writes score.json)")
    args = ap.parse_args(argv)
    if args.score:
        result = score(Path(args.out), args.catalog)
        (Path(args.out) / "score.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return

    from sdk.preprocess import TextTokenizer

    from .features import text_features
    from .towers import load_text_tower, text_tower_path

    torch.set_num_threads(max(1, torch.get_num_threads()))
    feat = Path(args.features)
    ids = json.loads((feat / "meta.json").read_text())["ids"]
    products = {p.id: p for p in read_catalog(args.catalog)}
    n = args.limit or len(ids)
    titles = [products[int(i)].title for i in ids[:n]]
    deep = np.load(feat / "img_deep.npy", mmap_mode="r")
    has_image = np.load(feat / "has_image.npy")[:n]
    model, tok = load_reasoner(args.reasoner)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text_model = load_text_tower()
    text_tok = TextTokenizer(text_tower_path() / "tokenizer.json", TRACE_LEN)
    for view in args.views:
        t0 = time.time()
        if view == ORACLE:
            texts = [trace_target(products[int(i)].record) for i in ids[:n]]
            counts = [len(tok.encode(t).ids) for t in texts]
            hidden = None
        else:
            texts, counts, hidden = catalog_traces(model, tok, titles, deep, has_image, view, args.batch,
                                                   args.max_new_tokens)
        secs = max(time.time() - t0, 1e-9)
        with (out / f"{view}.jsonl").open("w", encoding="utf-8") as f:
            for i, t, c in zip(ids[:n], texts, counts):
                f.write(json.dumps({"id": int(i), "trace": t, "tokens": c}) + "\n")
        if hidden is not None:
            np.save(out / f"{view}_hidden.npy", hidden)
        st, m = text_features(text_model, text_tok, texts, desc=f"trace states {view}")
        np.save(out / f"{view}_tok.npy", st)
        np.save(out / f"{view}_mask.npy", m)
        info = {"view": view, "items": n, "seconds": round(secs, 1), "tokens": int(sum(counts)),
                "tokens_per_s": round(sum(counts) / secs, 1), "truncated_by_trace_len": int((m.sum(1) >= TRACE_LEN).sum())}
        (out / f"{view}.json").write_text(json.dumps(info))
        print(json.dumps(info))


if __name__ == "__main__":
    main()
