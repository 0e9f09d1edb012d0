"""Reading a product catalog (items.jsonl + images/) and its leak-free train/validation split."""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..paths import file_sha256

SPLIT_RULE = "leak-free-v1"  # recorded beside every feature cache and report that used the split


def legacy_is_validation(item_id: int) -> bool:
    """The split this project used before `catalog_split`: ids ending in 0. It lets a product's
    design (same title) or its very photo sit on both sides; kept only to report old numbers once
    for continuity."""
    return int(item_id) % 10 == 0


def normalize_title(title: str) -> str:
    """A title's design key: lower case, runs of anything but letters and digits become one space."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(title).lower()).split())


def title_words(title: str) -> tuple[str, ...]:
    """A title's words whatever their order and number: `normalize_title`'s words with a plural
    "s" taken off (words over three letters), sorted."""
    return tuple(sorted(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in normalize_title(title).split()))


@dataclass(frozen=True)
class Split:
    """A catalog's leak-free train/validation split.

    Products are joined into groups when they share a normalised title (one design in other
    colours or sizes) or a byte-identical photo, transitively; a whole group is validation when
    any of its products has an id ending in 0 (the old validation products all stay validation,
    and the training products that shared a design or a photo with one of them move over). No
    title and no photo is therefore on both sides.

    Attributes:
        validation_ids: ids of the validation products.
        group: id -> group number (products of one group share a design or a photo).
    """

    validation_ids: frozenset[int]
    group: dict[int, int]

    def is_validation(self, item_id: int) -> bool:
        return int(item_id) in self.validation_ids

    def mask(self, ids: Iterable[int]) -> np.ndarray:
        """Boolean validation mask over `ids` (in their order)."""
        return np.array([int(i) in self.validation_ids for i in ids], dtype=bool)

    @classmethod
    def of(cls, products: Sequence["Product"]) -> "Split":
        """The split of these products (photos are read to hash them)."""
        parent: dict = {}

        def find(x):
            while parent.setdefault(x, x) != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for p in products:
            root = find(("id", p.id))
            keys = [("title", normalize_title(p.title))]
            if p.image is not None and Path(p.image).is_file():
                keys.append(("photo", file_sha256(p.image)))
            for k in keys:
                parent[find(k)] = root
        number: dict = {}
        group = {p.id: number.setdefault(find(("id", p.id)), len(number)) for p in products}
        val_groups = {g for pid, g in group.items() if pid % 10 == 0}
        return cls(frozenset(pid for pid, g in group.items() if g in val_groups), group)

    def summary(self) -> dict:
        n_val = len(self.validation_ids)
        return {"rule": SPLIT_RULE, "products": len(self.group), "validation": n_val,
                "train": len(self.group) - n_val, "groups": len(set(self.group.values()))}


_SPLITS: dict[tuple[str, int, int], Split] = {}


def catalog_split(root: str | Path) -> Split:
    """The leak-free split of the catalog in `root` (memoised per items.jsonl version).

    Raises:
        FileNotFoundError, ValueError: as `read_catalog`.
    """
    path = (Path(root) / "items.jsonl").resolve()
    st = path.stat() if path.is_file() else None
    key = (str(path), st.st_mtime_ns if st else 0, st.st_size if st else 0)
    if key not in _SPLITS:
        _SPLITS[key] = Split.of(read_catalog(root))
    return _SPLITS[key]


@dataclass(frozen=True)
class Product:
    id: int
    title: str
    brand: str
    description: str
    article_type: str
    record: dict
    image: Path | None

    @property
    def detail_text(self) -> str:
        """Second text view of a product: brand and description."""
        desc = " ".join(self.description.split()) or self.title
        return f"{self.brand}. {desc}" if self.brand else desc


def read_catalog(root: str | Path) -> list[Product]:
    """Read `items.jsonl` under `root`; image paths are resolved against `root`.

    Raises:
        FileNotFoundError: `root/items.jsonl` does not exist.
        ValueError: a line is not valid JSON or lacks `id`/`title`.
    """
    root = Path(root)
    path = root / "items.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"catalog file not found: {path} (expected items.jsonl in {root})")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                pid, title = int(r["id"]), str(r["title"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: bad catalog record ({exc})") from exc
            img = r.get("image")
            out.append(
                Product(
                    id=pid,
                    title=title,
                    brand=str(r.get("brand") or ""),
                    description=str(r.get("description") or ""),
                    article_type=str(r.get("article_type") or ""),
                    record=r,
                    image=(root / img) if img else None,
                )
            )
    return out


def catalog_records(root: str | Path, train_only: bool) -> list[dict]:
    """The raw items.jsonl records of a catalog folder; with train_only, those of its training
    split (all of them when the folder holds validation products only, as data/samples does)."""
    path = Path(root) / "items.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"catalog file not found: {path}")
    recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    split = catalog_split(root) if train_only else None
    kept = [r for r in recs if not (split and split.is_validation(r["id"]))]
    return kept or recs  # a folder holding only validation products (data/samples) still calibrates


def stratified_records(records: Sequence[dict], n: int, seed: int = 0) -> list[dict]:
    """Up to n records, round robin over article types (shuffled within each type)."""
    rng = random.Random(seed)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(r.get("article_type") or "")].append(r)
    for g in groups.values():
        rng.shuffle(g)
    order = sorted(groups, key=lambda k: (-len(groups[k]), k))
    out: list[dict] = []
    while len(out) < n and any(groups.values()):
        for k in order:
            if groups[k] and len(out) < n:
                out.append(groups[k].pop())
    return out
