"""The prompt term: each photo-only vector picks its class of a catalog field (article type,
colour, gender, brand) among class prompts ("a {} item") run through the model being trained, so
zero-shot search by a field's words finds photos."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .feature_cache import Features, row_values

DEFAULT_PROMPT_FIELDS = "article_type,base_colour,gender"


PROMPT_FIELDS = {  # field -> training templates (the validation suite's zero-shot prompts are other words)
    "article_type": ("a {} item", "{} for sale"),
    "base_colour": ("{} coloured", "in {}"),
    "gender": ("for {}", "{} style"),
    "brand": ("by {}", "a {} product"),
}


PROMPT_MIN_ROWS = 5  # a class is prompted when at least this many training products have it


@dataclass
class FieldPrompts:
    """One field's class prompts: MiniLM states (C * templates, L, 384) + mask, each training
    row's class (-1: none of the prompted classes) and the class names."""

    field: str
    tokens: torch.Tensor
    mask: torch.Tensor
    label: np.ndarray
    classes: list[str]


def field_prompts(f: Features, catalog: str | Path | None, train_rows: np.ndarray,
                  fields: Sequence[str] = tuple(DEFAULT_PROMPT_FIELDS.split(","))) -> list[FieldPrompts]:
    """The prompt term's classes: per field (of `PROMPT_FIELDS`), the values at least
    `PROMPT_MIN_ROWS` training products have, their prompts run through the frozen text tower."""
    if catalog is None:
        raise ValueError("prompt_weight needs the catalog (its product fields)")
    out = []
    for name in fields:
        templates = PROMPT_FIELDS[name]
        vals = np.array([str(v or "").strip() for v in row_values(f, catalog, lambda p, n=name: p.record.get(n))],
                        dtype=object)
        counts = Counter(vals[train_rows])
        classes = sorted(v for v, n in counts.items() if v and n >= PROMPT_MIN_ROWS)
        if len(classes) < 2:
            continue
        index = {c: i for i, c in enumerate(classes)}
        states, mask = prompt_states([t.format(c.lower()) for c in classes for t in templates])
        out.append(FieldPrompts(name, states, mask, np.array([index.get(v, -1) for v in vals]), classes))
    if not out:
        raise ValueError(f"prompt_weight: no field of {sorted(fields)} has two classes with "
                         f">= {PROMPT_MIN_ROWS} training products")
    return out


def prompt_states(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Short texts through the frozen text tower, as the feature cache's captions are: token
    states (N, L, 384) float32 and mask (N, L)."""
    from sdk.preprocess import TextTokenizer

    from .features import CAPTION_LEN
    from .towers import load_text_tower, text_tower_path

    ids, mask = TextTokenizer(text_tower_path() / "tokenizer.json", CAPTION_LEN)(texts)
    with torch.no_grad():
        states = load_text_tower()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    return states.float(), torch.from_numpy(mask).float()


def prompt_term(model, prompts: list[FieldPrompts], e_img: torch.Tensor, rows: np.ndarray, has_img: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Mean over fields of the cross-entropy of each photo-only vector (e_img, B x D) picking its
    class among the field's prompt vectors (each class: the mean of its templates' title-only
    vectors, through the model being trained)."""
    total, n = e_img.sum() * 0.0, 0
    for p in prompts:
        label = torch.as_tensor(p.label[rows])
        ok = has_img & (label >= 0)
        if not ok.any():
            continue
        b = len(p.tokens)
        d = model.cfg.d_model
        present = torch.tensor([[0.0, 1.0, 0.0]]).expand(b, 3)
        e = model(None, None, p.tokens, p.mask, torch.zeros(b, 1, p.tokens.shape[-1]), torch.zeros(b, 1), present,
                  image_tokens=torch.zeros(b, model.cfg.n_image_tokens, d))
        centers = F.normalize(e.reshape(len(p.classes), -1, e.shape[-1]).mean(1), dim=-1)  # (C, D)
        total = total + F.cross_entropy(e_img[ok] @ centers.T * scale, label[ok])
        n += 1
    return total / max(n, 1)
