"""Missing-modality benchmark (MMPCBench-style) on the validation split; see `main` for the protocol.

    python -m sdk.train.eval_missing --catalog ../shared/data/catalog --features .cache/features \
        --engine moon3.engine --captions runs/mmpc/captions.json --out runs/mmpc/eval_missing.json
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


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
