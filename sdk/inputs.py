"""What the embedder is given, made ready for its graphs: per-item columns checked, records read,
texts tokenized to the engine's budgets and ordered by length, batches padded into feeds.

Every check here names the item it is about ("item 3: title must be a str ...") and never stops the
other items: problems are collected per index (see `sdk.Embedder.embed`'s error semantics).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from sdk.contract import IMAGE, INPUT_NAMES, TEXT, TRACE
from sdk.errors import InvalidInputError

__all__ = ["EngineTokenizer", "Items", "Tokenized", "collect_items", "feed", "pad_tokens", "record_columns",
           "text_column", "tokenize"]


class EngineTokenizer:
    """`sdk.preprocess.TextTokenizer` built from an engine's tokenizer.json text instead of a file.

    Same settings (no padding, truncation to `max_length`); it also tells which items were cut.
    Immutable after construction, so threads may share it.
    """

    def __init__(self, json_text: str, max_length: int):
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._tok = Tokenizer.from_str(json_text)
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)

    def encode(self, texts: list[str]) -> list[tuple[list[int], bool]]:
        """texts -> [(token ids, truncated?)] (truncated: the text did not fit max_length)."""
        return [(e.ids, bool(e.overflowing)) for e in self._tok.encode_batch(texts)]


@dataclass
class Items:
    """A call's items as per-item lists: absent text is None, `errors` the problems found so far."""

    n: int
    images: list[Any]
    texts: list[str | None]  # None = absent
    traces: list[str | None]
    errors: dict[int, str]


@dataclass
class Tokenized:
    """The good items' token ids, the order to batch them in and what was cut to the budget."""

    ids: dict[int, tuple[list[int], list[int]]]  # item -> (title ids, trace ids)
    order: list[int]  # items sorted by token length: neighbours pad to nearly the same length
    truncated: dict[int, tuple[str, ...]]


def pad_tokens(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token ids with 0 to the longest (>= 1), as TextTokenizer does -> (ids, mask) (B, T)."""
    t = max(1, max((len(s) for s in seqs), default=1))
    ids = np.zeros((len(seqs), t), np.int64)  # (B, T)
    mask = np.zeros((len(seqs), t), np.int64)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def collect_items(
    images: Any,
    texts: Any,
    traces: Any,
    *,
    what: str = "item",
    labels: tuple[str, str, str] = ("image", "text", "trace"),
    pre: dict[int, str] | None = None,
) -> Items:
    """Columns -> per-item lists, absent text normalised to None, cheap per-item checks.

    Raises:
        InvalidInputError: the call itself is malformed (a column is a single item, lengths differ).
    """
    cols = [_column(images, "images", allow_array=True), _column(texts, "texts"), _column(traces, "traces")]
    given = [c for c in cols if c is not None]
    n = len(given[0]) if given else 0
    if any(len(c) != n for c in given):
        named = zip(("images", "texts", "traces"), cols)
        lens = ", ".join(f"{name} {len(c)}" for name, c in named if c is not None)
        raise InvalidInputError(f"images, texts and traces must have one entry per item, got {lens}")
    imgs, txts, trcs = ([None] * n if c is None else c for c in cols)
    errors: dict[int, str] = {}
    out_texts: list[str | None] = []
    out_traces: list[str | None] = []
    for i in range(n):
        problem = (pre or {}).get(i)
        norm = []
        for label, value in ((labels[1], txts[i]), (labels[2], trcs[i])):
            if value is not None and not isinstance(value, str):
                problem = problem or f"{what} {i}: {label} must be a str or None, got {type(value).__name__}"
                value = None
            elif value is not None and (bad := _lone_surrogate(value)) is not None:
                problem = problem or (f"{what} {i}: {label} is not valid Unicode (lone surrogate at "
                                      f"character {bad}); decode bytes with errors='replace'")
                value = None
            norm.append(value if value is not None and value.strip() else None)
        text, trace = norm
        if problem is None and imgs[i] is None and text is None and trace is None:
            said = ", ".join(
                f"no {label}" if v is None else f"{label} is empty/whitespace"
                for label, v in ((labels[0], imgs[i]), (labels[1], txts[i]), (labels[2], trcs[i]))
            )
            problem = f"{what} {i}: nothing to embed ({said}); give at least one modality"
        if problem is not None:
            errors[i] = problem
        out_texts.append(text)
        out_traces.append(trace)
    return Items(n, list(imgs), out_texts, out_traces, errors)


def record_columns(
    records: Iterable[Mapping[str, Any]], root: str | os.PathLike | None
) -> tuple[list[Any], list[Any], list[Any], dict[int, str]]:
    """Catalog records (the `items.jsonl` format) -> (images, titles, traces, problems by index).

    Raises:
        InvalidInputError: `records` is not a sequence of records.
    """
    if isinstance(records, (str, bytes, Mapping)):
        raise InvalidInputError(
            f"records must be a sequence of dicts (one per product), got a {type(records).__name__}"
        )
    images: list[Any] = []
    texts: list[Any] = []
    traces: list[Any] = []
    pre: dict[int, str] = {}
    for i, rec in enumerate(records):
        img = title = trace = None
        if not isinstance(rec, Mapping):
            pre[i] = f"record {i}: is a {type(rec).__name__}, expected a dict with 'title' and optional 'image'"
        else:
            title, trace, img = rec.get("title"), rec.get("trace"), rec.get("image")
            if img is not None and img != "":
                if not isinstance(img, (str, os.PathLike)):
                    pre[i] = f"record {i}: image must be a path (str), got {type(img).__name__}"
                    img = None
                else:
                    img = Path(root) / img if root is not None else Path(img)
            else:
                img = None
        images.append(img)
        texts.append(title)
        traces.append(trace)
    return images, texts, traces, pre


def tokenize(items: Items, good: list[int], text_tok: EngineTokenizer, trace_tok: EngineTokenizer) -> Tokenized:
    """Tokenize the good items' titles and traces; absent text is the tokenized "" (presence 0),
    as in the teacher."""
    text_enc = text_tok.encode([items.texts[i] or "" for i in good])
    trace_enc = trace_tok.encode([items.traces[i] or "" for i in good])
    truncated: dict[int, tuple[str, ...]] = {}
    for i, (_, tcut), (_, scut) in zip(good, text_enc, trace_enc):
        cut = tuple(k for k, c in (("text", tcut), ("trace", scut)) if c)
        if cut:
            truncated[i] = cut
    ids = {i: (t[0], s[0]) for i, t, s in zip(good, text_enc, trace_enc)}
    order = sorted(good, key=lambda i: (len(ids[i][1]), len(ids[i][0]), i))
    return Tokenized(ids, order, truncated)


def feed(items: Items, chunk: list[int], tok: Tokenized, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The graph feed (keyed by `INPUT_NAMES`) of the items `chunk`, whose photos are decoded into
    `pixels` (B, 3, H, W) row by row."""
    present = np.zeros((len(chunk), 3), np.float32)  # (B, 3)
    for r, i in enumerate(chunk):
        present[r, IMAGE] = items.images[i] is not None
        present[r, TEXT] = items.texts[i] is not None
        present[r, TRACE] = items.traces[i] is not None
    ids, mask = pad_tokens([tok.ids[i][0] for i in chunk])  # (B, T)
    tids, tmask = pad_tokens([tok.ids[i][1] for i in chunk])  # (B, S)
    return dict(zip(INPUT_NAMES, (pixels, ids, mask, tids, tmask, present)))


def text_column(values: Any, name: str) -> list[str]:
    """A column that must hold a str per item (e.g. texts to count tokens of).

    Raises:
        InvalidInputError: `values` is not a sequence (or is a single str), or an item is not a str
            or is not valid Unicode; the message names the item.
    """
    col = _column(values, name)
    if col is None:
        raise InvalidInputError(f"{name} must be a sequence of str, got None")
    for i, v in enumerate(col):
        if not isinstance(v, str):
            raise InvalidInputError(f"{name}[{i}] must be a str, got {type(v).__name__}")
        if (bad := _lone_surrogate(v)) is not None:
            raise InvalidInputError(f"{name}[{i}] is not valid Unicode (lone surrogate at character {bad}); "
                                    "decode bytes with errors='replace'")
    return col


def _lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (text that cannot be UTF-8, e.g. bytes decoded with
    errors="surrogateescape"), or None; the tokenizer refuses such text for the whole batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _column(values: Any, name: str, allow_array: bool = False) -> list[Any] | None:
    """One input column -> a list, refusing a single item passed where a list belongs."""
    if values is None:
        return None
    if isinstance(values, (str, bytes, bytearray, memoryview, os.PathLike, Mapping)):
        raise InvalidInputError(
            f"{name} must be a sequence with one entry per item, got a single {type(values).__name__}; "
            f"wrap it in a list"
        )
    if isinstance(values, np.ndarray):
        if not (allow_array and values.ndim == 4):
            raise InvalidInputError(
                f"{name} must be a sequence with one entry per item, got an array of shape {values.shape}"
                + ("; pass a list of HWC arrays or one (N, H, W, C) uint8 array" if allow_array else "")
            )
        return list(values)
    if allow_array and hasattr(values, "getpixel"):  # a single PIL image
        raise InvalidInputError(
            f"{name} must be a sequence with one entry per item, got a single image; wrap it in a list"
        )
    try:
        return list(values)
    except TypeError:
        raise InvalidInputError(
            f"{name} must be a sequence with one entry per item, got {type(values).__name__}"
        ) from None
