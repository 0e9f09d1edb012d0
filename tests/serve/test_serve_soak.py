"""Soak: many mixed good and bad requests against one real server; its resident memory, sampled
through the run, must stay flat after warm-up (growth < 5%; TEI #156 grew 6 GB -> 42 GB over
~400k calls), and every request must get the answer its kind calls for.

The 100k run is marked slow; a 5k run is in the default suite. To record the long run's result:

    MOON3_SERVE_SOAK_OUT=docs/results/serve_soak.json .venv/bin/python -m pytest tests/serve/test_serve_soak.py -m slow
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time

import httpx
import numpy as np
import pytest
from serve_helpers import TITLES, Server, b64, photo

from sdk.serve.client import Connection

MAX_GROWTH = 0.05
CONCURRENCY = 16


def _requests(total: int, seed: int = 0):
    """(path, body bytes, expected status) for each request: titles, photo + title, a good and a
    bad item, a 1x1 photo, broken JSON, all items bad."""
    rng = np.random.default_rng(seed)
    photos = [b64(photo(k, int(rng.integers(1, 160)), int(rng.integers(1, 160)), ("PNG", "JPEG")[k % 2]))
              for k in range(24)]
    one_px = b64(photo(99, 1, 1))
    kinds = ["titles", "photo", "mixed", "one_px", "broken", "all_bad"]
    p = [0.6, 0.2, 0.08, 0.05, 0.04, 0.03]
    for k in range(total):
        kind = kinds[int(rng.choice(len(kinds), p=p))]
        if kind == "titles":
            n = int(rng.integers(1, 4))
            body = {"input": [f"{TITLES[int(rng.integers(8))]} {k}" for _ in range(n)]}
            yield kind, "/v1/embeddings", json.dumps(body).encode(), 200
        elif kind == "photo":
            body = {"items": [{"id": k, "title": TITLES[k % 8], "image": photos[int(rng.integers(24))]}]}
            yield kind, "/v1/embed", json.dumps(body).encode(), 200
        elif kind == "mixed":
            body = {"items": [{"id": k, "title": TITLES[k % 8]}, {"id": -k, "image": b64(b"\x89PNG broken")}]}
            yield kind, "/v1/embed", json.dumps(body).encode(), 207
        elif kind == "one_px":
            yield kind, "/v1/embed", json.dumps({"items": [{"image": one_px}]}).encode(), 200
        elif kind == "broken":
            yield kind, "/v1/embeddings", b'{"input": ["unterminated', 400
        else:
            yield kind, "/v1/embeddings", json.dumps({"input": ["", "  "]}).encode(), 422


def soak(server: Server, total: int, samples: int = 20) -> dict:
    reqs = list(_requests(total))
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    port = int(port)
    series: list[tuple[int, int]] = []
    wrong: list[str] = []
    counts: dict[str, int] = {}
    every = max(1, total // samples)
    nxt = 0

    async def worker(it):
        nonlocal nxt
        async with Connection(host, port) as c:
            for k, (kind, path, body, want) in it:
                status, _, text = await c.post(path, body)
                counts[kind] = counts.get(kind, 0) + 1
                if status != want and len(wrong) < 20:
                    wrong.append(f"request {k} ({kind}): {status}, wanted {want}: {text[:200]!r}")
                if k >= nxt:
                    nxt += every
                    series.append((k, server.rss()))

    async def go():
        it = iter(enumerate(reqs))
        await asyncio.gather(*(worker(it) for _ in range(CONCURRENCY)))

    t0 = time.perf_counter()
    asyncio.run(go())
    seconds = time.perf_counter() - t0
    series.append((total, server.rss()))
    warm = len(series) // 5  # the first fifth warms up (allocator pools, the arena's largest shapes)
    base = float(np.median([r for _, r in series[warm:warm + 3]]))
    end = float(np.median([r for _, r in series[-3:]]))
    return {"requests": total, "concurrency": CONCURRENCY, "seconds": round(seconds, 2),
            "requests_per_s": round(total / seconds, 1), "kinds": counts, "wrong_answers": wrong,
            "rss_mib": [[k, round(r / 2**20, 2)] for k, r in series], "baseline_mib": round(base / 2**20, 2),
            "end_mib": round(end / 2**20, 2), "growth": round(end / base - 1, 5)}


def _run(engine_path, total: int, warmup: int = 0) -> dict:
    """`total` requests measured, after `warmup` unmeasured ones on the same server (a short soak
    would otherwise measure the allocator's first growth, not a leak: a leak keeps growing)."""
    s = Server(engine_path, "--max-batch", "16", "--max-wait-ms", "2", "--queue", "512")
    try:
        if warmup:
            assert not soak(s, warmup)["wrong_answers"]
        res = soak(s, total)
        res["errors_total"] = {k: v for k, v in s.metrics().items() if k.startswith("moon3_errors_total")}
        assert s.proc.poll() is None and httpx.get(s.url + "/ready").status_code == 200
    finally:
        assert s.stop() == 0
    assert not res["wrong_answers"], res["wrong_answers"]
    assert sum(res["kinds"].values()) == total
    return res


def test_soak_5k_rss_flat(engine_path):
    res = _run(engine_path, 5_000, warmup=2_000)
    assert res["growth"] < MAX_GROWTH, res


@pytest.mark.slow
def test_soak_100k_rss_flat(engine_path):
    res = _run(engine_path, 100_000)
    out = os.environ.get("MOON3_SERVE_SOAK_OUT")
    if out:
        res |= {"command": "MOON3_SERVE_SOAK_OUT=docs/results/serve_soak.json .venv/bin/python -m pytest "
                           "tests/serve/test_serve_soak.py -m slow",
                "engine": "the tiny split FP32 engine of tests/conftest.py (server: --max-batch 16 --max-wait-ms 2)",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                "max_growth": MAX_GROWTH}
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    assert res["growth"] < MAX_GROWTH, res
