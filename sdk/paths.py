"""Where things live (the package's own folders, a source checkout's data and reports), and
what a file's bytes hash to.

`WEIGHTS` ships inside the package (the trained teacher, the completion part and their model
cards); `SAMPLES`, `CALIB` and `RESULTS` exist in a source checkout only (an installed wheel has
no `data/` or `docs/`), so their readers check that they are there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent  # a source checkout's root
WEIGHTS = PACKAGE / "train" / "weights"  # the shipped teacher (embedder.json + .safetensors)
COMPLETION_WEIGHTS = WEIGHTS / "completion"
REASONER_WEIGHTS = WEIGHTS / "reasoner"
ATTRIBUTE_HEADS_WEIGHTS = WEIGHTS / "attribute_heads"  # the reasoner's attribute heads (sdk.train.attribute_heads)
SAMPLES = REPO / "data" / "samples"  # validation-split products with photos (the examples, the quickstart)
CALIB = REPO / "data" / "calib"  # training-split products (calibration, the INT8 text gate)
RESULTS = REPO / "docs" / "results"  # committed experiment reports


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
