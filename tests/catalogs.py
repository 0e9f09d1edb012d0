"""Test catalogs built from data/samples (no files outside the repository, nothing downloaded)."""

import json
from pathlib import Path
from types import SimpleNamespace

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def write_catalog(folder: Path, copies: int = 1, bad: bool = True) -> SimpleNamespace:
    """A catalog in `folder`: the sample products (`copies` times, new ids), plus bad items.

    Returns .path (items.jsonl), .records (as written), .bad_ids (ids that must be reported).
    Image paths stay relative to data/samples (pass root=SAMPLES); the bad photo is absolute.
    """
    base = [json.loads(line) for line in (SAMPLES / "items.jsonl").read_text().splitlines() if line.strip()]
    records = []
    for c in range(copies):
        records += [{**r, "id": r["id"] + 100_000 * c} for r in base]
    bad_ids = []
    if bad:
        corrupt = folder / "corrupt.jpg"
        corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        extra = [
            {"id": 900_001, "title": "Men Red Shoes", "image": str(corrupt)},  # corrupt photo
            {"id": 900_002, "title": "   ", "image": None},  # nothing to embed
            {"id": 900_003, "title": "Women Blue Dress", "image": "images/does-not-exist.jpg"},  # missing photo
        ]
        # Spread them so they fall into different shards.
        for k, r in enumerate(extra):
            records.insert(min(len(records), 7 + 50 * k), r)
        bad_ids = [r["id"] for r in extra]
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return SimpleNamespace(path=path, records=records, bad_ids=bad_ids, root=SAMPLES)


def reference(engine_path, cat) -> dict:
    """id -> vector from one single-process `Embedder.embed_products` call over the catalog (bad ids: NaN)."""
    import warnings

    from sdk import Embedder
    from sdk.errors import BatchError, TruncationWarning

    with Embedder(engine_path, threads=1) as emb, warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)  # the tiny engine's token budget is 12
        try:
            v = emb.embed_products(cat.records, root=cat.root)
        except BatchError as exc:
            v = exc.vectors
    return {r["id"]: row for r, row in zip(cat.records, v)}
