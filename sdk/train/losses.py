"""The training losses of the embedder: in-batch InfoNCE, supervised contrastive terms,
distillation and relational (in-batch similarity) terms."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def info_nce(a, b, same, valid_a, valid_b, scale):
    """Symmetric InfoNCE between rows of a and b (B, D); `same` (B, B) masks non-diagonal positives."""
    logits = scale * a @ b.T  # (B, B)
    eye = torch.eye(len(a), dtype=torch.bool)
    blocked = (same & ~eye) | ~valid_b[None, :]
    l_ab = logits.masked_fill(blocked, -1e4)
    blocked_t = (same & ~eye) | ~valid_a[None, :]
    l_ba = logits.T.masked_fill(blocked_t, -1e4)
    target = torch.arange(len(a))
    ce_ab = F.cross_entropy(l_ab, target, reduction="none")[valid_a & valid_b]
    ce_ba = F.cross_entropy(l_ba, target, reduction="none")[valid_a & valid_b]
    if ce_ab.numel() == 0:
        return logits.sum() * 0.0
    return 0.5 * (ce_ab.mean() + ce_ba.mean())


def category_term(e: torch.Tensor, labels: np.ndarray, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) over rows of e (B, D), L2-normalised: each
    valid row's log-probability of the other valid rows with its label (B,), averaged over those
    positives; rows without a positive take no part."""
    lab = np.asarray(labels)
    same = torch.as_tensor(lab[:, None] == lab[None, :])
    eye = torch.eye(len(e), dtype=torch.bool)
    logits = (scale * e @ e.T).masked_fill(eye | ~valid[None, :], -1e4)
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = same & ~eye & valid[None, :] & valid[:, None]
    n = pos.sum(1)
    rows = n > 0
    if not rows.any():
        return e.sum() * 0.0
    return (-(logp * pos).sum(1)[rows] / n[rows]).mean()


def distill_terms(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, temperature: float):
    """(1 - cosine, relational KL) of student rows to the teacher's rows of the same items.

    Both are L2-normalised (B, D); the relational term compares each row's softmax over its
    in-batch similarities (teacher as the target), so the student keeps the teacher's geometry,
    not only its directions. Rows where `valid` is False take no part.
    """
    s, t = student[valid], teacher[valid]
    if len(s) < 2:
        return student.sum() * 0.0, student.sum() * 0.0
    cos = (1.0 - (s * t).sum(-1)).mean()
    return cos, relational_kl(s, t, temperature)


def relational_kl(s: torch.Tensor, t: torch.Tensor, temperature: float, t_temperature: float | None = None):
    """KL from the teacher rows' in-batch similarity distributions to the student's: s (B, Ds)
    and t (B, Dt) L2-normalised, any widths."""
    return F.kl_div(F.log_softmax(s @ s.T / temperature, -1), F.softmax(t @ t.T / (t_temperature or temperature), -1),
                    reduction="batchmean")
