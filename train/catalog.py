"""Reading a product catalog (items.jsonl + images/) and the fixed train/validation split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def is_validation(item_id: int) -> bool:
    """The validation slice: every product whose id ends in 0 (about 10%). Never trained on."""
    return int(item_id) % 10 == 0


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
