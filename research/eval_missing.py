"""Missing-modality benchmark (MMPCBench-style) on the validation split.

    python -m research.eval_missing --catalog ../shared/data/catalog --features .cache/features \
        --engine moon3.engine --captions runs/mmpc/captions.json --out runs/mmpc/eval_missing.json

Protocol. Products: the validation split (ids ending in 0) that have a photo (both modalities
known, so the degraded item can be compared with the real one). Gallery: every product as photo
+ title, embedded by the FP32 teacher (`sdk/train/weights/embedder.*`). At a missing rate r, a seeded
random share r of the gallery loses one modality (seeds 0..4, the r=0.2 set inside the r=0.5 set
inside the r=0.8 set; the numbers are means over the seeds). Queries are never degraded:
  text->mm   the title alone;
  image->mm  the horizontally mirrored photo alone;
  mm->mm     the mirrored photo + brand/description (the embedder model card's second view).
A hit is a gallery product with the query's title (the embedder model card's definition); R@10,
and R@1 (R@10 saturates where the degraded modality is not the one the query looks at).

(a) image missing, the degraded product is embedded as
  completion   title + image tokens completed from the title (`sdk.train.completion`),
  zero-filled  title + all-zero image tokens, image marked present,
  dropped      title alone (image presence 0: the presence mask).
(b) title missing, the degraded product is embedded as
  generated    photo + the title the reasoner writes from the photo (the engine's `caption`
               task, greedy, as `sdk.Pipeline(complete_title=True)` does),
  empty        photo + the empty title ("" tokenized, text marked present),
  dropped      photo alone (text presence 0).

Completion quality of the generated titles against the real ones: corpus BLEU (sacrebleu,
default 13a tokenization), ROUGE-L F1 (longest common subsequence of lower-cased
whitespace tokens, averaged over products), the cosine between the teacher's text-only vectors of
the generated and the real title, exact-match rate and the number of distinct captions.

With --check-engine, the completed vectors are also computed through the runtime
(`sdk.Embedder(engine).embed(texts=titles, complete_missing="image")`, the engine's own text graph
and completion graph) and compared with the PyTorch ones (cosine mean / min).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdk.train.metrics import recall_at_k

RATES = (0.2, 0.5, 0.8)
SEEDS = (0, 1, 2, 3, 4)
QUERIES = ("text->mm", "image->mm", "mm->mm")


def generate_captions(engine: str | Path, products, cache: str | Path, threads: int = 1) -> dict[int, str]:
    """Titles written from each product's photo by the engine's reasoner (the `caption` task, greedy,
    exactly as `sdk.Pipeline(complete_title=True)` writes them), cached as JSON {id: caption}."""
    from sdk.reasoner import Reasoner

    cache = Path(cache)
    done: dict[int, str] = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    todo = [p for p in products if p.id not in done and p.image is not None]
    if todo:
        r = Reasoner(engine, threads=threads)
        for n, p in enumerate(tqdm(todo, desc="captions", unit="photo"), 1):
            done[p.id] = r.generate(image=p.image, task="caption")
            if n % 100 == 0 or n == len(todo):
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps({str(k): v for k, v in sorted(done.items())}, indent=0))
    return done


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two strings on lower-cased whitespace tokens (LCS by dynamic programming)."""
    c, r = candidate.lower().split(), reference.lower().split()
    if not c or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for x in c:
        cur = [0]
        for j, y in enumerate(r, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, q = lcs / len(c), lcs / len(r)
    return 2 * p * q / (p + q)


def corpus_bleu(candidates: list[str], references: list[str]) -> float:
    try:
        import sacrebleu
    except ImportError as exc:
        raise ImportError("BLEU needs sacrebleu: pip install 'moon3-sdk[eval]'") from exc
    return float(sacrebleu.corpus_bleu(candidates, [references]).score)


@torch.no_grad()
def evaluate(features, embedder, completion, tokens: dict, keys: np.ndarray, rows: np.ndarray,
             gen_states: tuple[torch.Tensor, torch.Tensor], empty_states: tuple[torch.Tensor, torch.Tensor],
             rates=RATES, seeds=SEEDS, bs: int = 256) -> dict:
    """The benchmark on `rows` (feature rows of validation products with a photo); see the module doc."""
    from sdk.train.completion import fuse, fuse_completed, real_skip, title_states

    pos = {int(r): i for i, r in enumerate(features.flip_rows)}
    views: dict[str, list[torch.Tensor]] = {}

    def add(name, v):
        views.setdefault(name, []).append(v)

    for s in range(0, len(rows), bs):
        r = rows[s : s + bs]
        title, mask = title_states(features, r)
        tok = torch.from_numpy(tokens["tokens"][r]).float()
        f = [pos[int(i)] for i in r]
        flip = torch.from_numpy(tokens["flip"][f]).float()
        # a skip-path embedder's real photos carry their skip terms (None without a skip path)
        sk, fsk = real_skip(tokens, "skip", r), real_skip(tokens, "flip_skip", f)
        detail, dmask = features.detail[r].float(), features.detail_mask[r].float()
        gtitle, gmask = gen_states[0][s : s + bs], gen_states[1][s : s + bs]
        etitle, emask = (x.expand(len(r), *x.shape[1:]) for x in empty_states)
        add("real", fuse(embedder, tok, title, mask, image_skip=sk))
        add("completion", fuse_completed(embedder, completion, title, mask))
        add("zero-filled", fuse(embedder, torch.zeros_like(tok), title, mask))
        add("image dropped", fuse(embedder, tok, title, mask, image_present=False))
        add("generated", fuse(embedder, tok, gtitle, gmask, image_skip=sk))
        add("empty", fuse(embedder, tok, etitle, emask, image_skip=sk))
        add("title dropped", fuse(embedder, tok, title, mask, text_present=False, image_skip=sk))
        add("text->mm", fuse(embedder, tok, title, mask, image_present=False))
        add("image->mm", fuse(embedder, flip, title, mask, text_present=False, image_skip=fsk))
        add("mm->mm", fuse(embedder, flip, detail, dmask, image_skip=fsk))
        add("generated title", fuse(embedder, tok, gtitle, gmask, image_present=False))
    v = {k: torch.cat(x) for k, x in views.items()}
    k = keys[rows]
    n = len(rows)
    result: dict = {"products": n, "rates": list(rates), "seeds": list(seeds), "R@10": {}, "R@10 std": {},
                    "R@1": {}, "R@1 std": {},
                    "full gallery R@10": {q: recall_at_k(v[q], v["real"], k, k)["R@10"] for q in QUERIES},
                    "full gallery R@1": {q: recall_at_k(v[q], v["real"], k, k)["R@1"] for q in QUERIES}}
    settings = {"image missing": ("completion", "zero-filled", "image dropped"),
                "title missing": ("generated", "empty", "title dropped")}
    for setting, methods in settings.items():
        for method in methods:
            for q in QUERIES:
                per_rate = []
                for rate in rates:
                    got = []
                    for seed in seeds:
                        lost = np.random.default_rng(seed).permutation(n)[: int(round(rate * n))]
                        g = v["real"].clone()
                        g[lost] = v[method][lost]
                        got.append(tuple(recall_at_k(v[q], g, k, k).values()))
                    per_rate.append((np.mean(got, 0), np.std(got, 0)))  # (R@1, R@10) each
                key = f"{setting} | {method} | {q}"
                for j, name in enumerate(("R@1", "R@10")):
                    result[name][key] = [round(float(m[j]), 4) for m, _ in per_rate]
                    result[f"{name} std"][key] = [round(float(s[j]), 4) for _, s in per_rate]
    real = v["real"]
    result["cosine to the real photo + title vector"] = {
        m: round(float((v[m] * real).sum(-1).mean()), 4)
        for m in ("completion", "zero-filled", "image dropped", "generated", "empty", "title dropped")}
    result["generated vs real title, text-only vector cosine"] = round(
        float((v["generated title"] * v["text->mm"]).sum(-1).mean()), 4)
    return result


@torch.no_grad()
def check_engine(engine: str | Path, features, embedder, completion, rows: np.ndarray, products) -> dict:
    """Cosine of the runtime's completed vectors (title, no photo, complete_missing="image") to PyTorch's."""
    from sdk import Embedder
    from sdk.train.completion import fuse_completed, title_states

    want = []
    for s in range(0, len(rows), 256):
        title, mask = title_states(features, rows[s : s + 256])
        want.append(fuse_completed(embedder, completion, title, mask))
    want = torch.cat(want).numpy()
    with Embedder(engine, threads=1) as e:
        got = e.embed(texts=[p.title for p in products], complete_missing="image")
        plain = e.embed(texts=[p.title for p in products])
        precision = e.precision
    cos = (got * want).sum(1)
    return {"engine": str(engine), "precision": precision, "products": len(rows),
            "cosine mean": round(float(cos.mean()), 5), "cosine min": round(float(cos.min()), 5),
            "completed vs text-only vector, cosine mean": round(float((got * plain).sum(1).mean()), 4)}


def _markdown(res: dict) -> str:
    rates = " / ".join(f"{r:g}" for r in res["rates"])
    lines = []
    for metric in ("R@10", "R@1"):
        lines += [f"{metric} at missing rates {rates} (mean of {len(res['seeds'])} seeds; {res['products']} validation "
                  f"products; no product missing anything: " +
                  ", ".join(f"{q} {v:.3f}" for q, v in res[f"full gallery {metric}"].items()) + ")", "",
                  "| missing | gallery item becomes | " + " | ".join(QUERIES) + " |",
                  "|---|---|" + "---|" * len(QUERIES)]
        for key in dict.fromkeys(k.rsplit(" | ", 1)[0] for k in res[metric]):
            setting, method = key.split(" | ")
            cells = [" / ".join(f"{x:.3f}" for x in res[metric][f"{key} | {q}"]) for q in QUERIES]
            lines.append(f"| {setting.split()[0]} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    q = res.get("title quality", {})
    if q:
        lines += [f"Generated titles vs real ({q['products']} products): BLEU {q['BLEU']:.1f}, ROUGE-L "
                      f"{q['ROUGE-L']:.3f}, title-vector cosine {q['title vector cosine']:.3f}, exact match "
                      f"{q['exact match']:.3f}, {q['distinct captions']} distinct captions."]
    c = res["cosine to the real photo + title vector"]
    lines += ["", "Mean cosine of the degraded product's vector to its real photo + title vector: "
              + ", ".join(f"{m} {x:.3f}" for m, x in c.items()) + "."]
    rc = res.get("runtime check")
    if rc:
        lines += ["", f"Runtime ({rc['engine']}, {rc['precision']}) vs PyTorch, completed vectors of "
                      f"{rc['products']} titles: cosine mean {rc['cosine mean']:.5f}, min {rc['cosine min']:.5f}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True, help="the catalog (titles, photos for the captions)")
    ap.add_argument("--features", default=".cache/features", help="feature cache of sdk.train.features")
    ap.add_argument("--embedder", default=None, help="frozen embedder weights folder (default: committed)")
    ap.add_argument("--completion", default=None, help="completion weights folder (default: committed)")
    ap.add_argument("--engine", default="moon3.engine", help="engine whose reasoner writes the captions")
    ap.add_argument("--captions", default="runs/mmpc/captions.json", help="caption cache (JSON id -> title)")
    ap.add_argument("--tokens-cache", default="runs/completion/image_tokens.npz")
    ap.add_argument("--check-engine", default=None,
                    help="an engine with a completion part: compare its completed vectors with PyTorch's")
    ap.add_argument("--out", default="runs/mmpc/eval_missing.json")
    args = ap.parse_args(argv)

    from sdk.paths import COMPLETION_WEIGHTS, WEIGHTS
    from sdk.preprocess import TextTokenizer
    from sdk.train.catalog import read_catalog
    from sdk.train.completion import image_tokens, load_completion
    from sdk.train.feature_cache import Features, title_keys
    from sdk.train.features import TITLE_LEN, text_features
    from sdk.train.fusion_model import embedder_sha256s, load_embedder
    from sdk.train.towers import load_text_tower, text_tower_path

    torch.set_num_threads(1)
    t0 = time.time()
    emb_dir = Path(args.embedder or WEIGHTS)
    embedder = load_embedder(emb_dir)
    names = embedder_sha256s(emb_dir)  # its own hash; an fp16 copy's FP32 source's too
    sha = names[0]
    completion, meta = load_completion(args.completion or COMPLETION_WEIGHTS)
    if meta.get("embedder_sha256") not in names:
        raise SystemExit(f"the completion weights were trained against other embedder weights than {emb_dir}; "
                         f"re-train them (python -m sdk.train.completion)")
    features = Features(args.features)
    tokens = image_tokens(embedder, features, args.tokens_cache, sha)
    keys = title_keys(features, args.catalog)
    products = {p.id: p for p in read_catalog(args.catalog)}
    has = features.has_image.numpy().astype(bool)
    rows = np.flatnonzero(features.is_val & has)
    val = [products[int(features.ids[i])] for i in rows]

    captions = generate_captions(args.engine, val, args.captions)
    gen = [captions[p.id] for p in val]
    text = load_text_tower()
    tok = TextTokenizer(text_tower_path() / "tokenizer.json", TITLE_LEN)
    st, m = text_features(text, tok, [g if g.strip() else "" for g in gen], desc="generated titles")
    gen_states = (torch.from_numpy(st).float(), torch.from_numpy(m).float())
    gen_states = (gen_states[0][:, : int(m.sum(1).max())], gen_states[1][:, : int(m.sum(1).max())])
    est, em = text_features(text, tok, [""], desc="empty title")
    n_empty = int(em.sum(1).max())
    empty_states = (torch.from_numpy(est[:, :n_empty]).float(), torch.from_numpy(em[:, :n_empty]).float())

    res = evaluate(features, embedder, completion, tokens, keys, rows, gen_states, empty_states)
    real = [p.title for p in val]
    res["title quality"] = {
        "products": len(val), "BLEU": round(corpus_bleu(gen, real), 2),
        "ROUGE-L": round(float(np.mean([rouge_l(g, r) for g, r in zip(gen, real)])), 4),
        "title vector cosine": res.pop("generated vs real title, text-only vector cosine"),
        "exact match": round(float(np.mean([g.strip().lower() == r.strip().lower() for g, r in zip(gen, real)])), 4),
        "distinct captions": len(set(gen)),
    }
    if args.check_engine:
        res["runtime check"] = check_engine(args.check_engine, features, embedder, completion, rows, val)
    res["embedder_sha256"] = sha
    res["completion"] = str(args.completion or COMPLETION_WEIGHTS)
    res["seconds"] = round(time.time() - t0, 1)
    res["markdown"] = _markdown(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(res["markdown"])
    print(f"\nwrote {out} in {res['seconds']} s")


if __name__ == "__main__":
    main()
