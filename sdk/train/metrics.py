"""Retrieval and classification metrics shared by training, the validation suite, the build's
gates and the research evaluations (NumPy; a CPU torch tensor is read as an array)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (rows of zeros stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def recall_at_k(q, g, q_key: np.ndarray, g_key: np.ndarray, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Recall@k of L2-normalised queries (Q, D) against a gallery (G, D): the share of queries with
    a relevant gallery row among their k most similar, a row being relevant when its key equals the
    query's (same product, same title group, ...). Rounded to 4 decimals."""
    q, g = np.asarray(q, dtype=np.float32), np.asarray(g, dtype=np.float32)
    sim = q @ g.T  # (Q, G)
    kmax = min(max(ks), sim.shape[1])
    top = np.argpartition(-sim, kmax - 1, axis=1)[:, :kmax]
    order = np.take_along_axis(sim, top, 1).argsort(1)[:, ::-1]
    top = np.take_along_axis(top, order, 1)  # (Q, kmax), best first
    hit = np.asarray(g_key)[top] == np.asarray(q_key)[:, None]
    return {f"R@{k}": round(float(hit[:, :k].any(1).mean()), 4) for k in ks}


def weighted_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """F1 per class of `y`, averaged with the classes' support as weights (sklearn's "weighted")."""
    total, score = len(y), 0.0
    for c in np.unique(y):
        tp = float(np.sum((pred == c) & (y == c)))
        prec = tp / max(1.0, float(np.sum(pred == c)))
        rec = tp / float(np.sum(y == c))
        f1 = 0.0 if tp == 0 else 2 * prec * rec / (prec + rec)
        score += f1 * np.sum(y == c) / total
    return round(float(score), 4)


def top1_misses(q: np.ndarray, g: np.ndarray, keys: np.ndarray, words: Sequence) -> dict[str, int]:
    """Queries `q` (n, D) against their own gallery `g` (n, D), row i relevant to row j when
    keys[i] == keys[j]: how many first hits miss, and how many of those misses' first hit has the
    query's own `words` (a title the query cannot tell from its own: "Men Check Blue Shirt" and
    "Men Blue Check Shirts")."""
    top = (np.asarray(q) @ np.asarray(g).T).argmax(1)
    miss = np.flatnonzero(keys[top] != keys)
    same = int(sum(words[top[i]] == words[i] for i in miss))
    return {"first-hit misses": int(len(miss)), "first-hit misses, same words": same}
