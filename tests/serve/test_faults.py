"""Faults: a flood gets 429s (never a crash, every request answered once), SIGTERM drains the
requests in flight, a damaged engine refuses to start, a bad item or a failing engine batch never
poisons later requests, and /ready tells the truth about it (the failures of infinity #609 / #367
and TEI #305)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time

import httpx
import numpy as np
import pytest
from serve_helpers import TITLES, Server, b64, photo

from sdk.errors import EngineError


async def _fire(url: str, bodies: list[dict], path: str = "/v1/embed", timeout: float = 120):
    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies), return_exceptions=True)


def test_a_flood_gets_429s_with_retry_after_and_every_request_is_answered_once(engine_path):
    s = Server(engine_path, "--max-batch", "4", "--max-wait-ms", "1", "--queue", "8", "--max-items", "8")
    try:
        big = b64(photo(1, 600, 600, "JPEG"))  # slow enough to decode that the queue fills
        n = 300
        bodies = [{"items": [{"id": k, "title": TITLES[k % 8], "image": big}]} for k in range(n)]
        t0 = time.monotonic()
        responses = asyncio.run(_fire(s.url, bodies))
        took = time.monotonic() - t0
        failed = [r for r in responses if isinstance(r, Exception)]
        assert not failed, f"{len(failed)} requests got no answer: {failed[:3]}"
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, sorted(set(codes))
        ok = [k for k, r in enumerate(responses) if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 429]
        assert ok and refused, (len(ok), len(refused))
        for k in ok:  # each answer is its own request's item, once
            assert [d["id"] for d in responses[k].json()["data"]] == [k]
        for r in refused:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error" and "queue is full" in r.json()["error"]["message"]
        m = s.metrics()
        assert m['moon3_errors_total{kind="queue_full"}'] == len(refused)
        assert m['moon3_requests_total{code="200",endpoint="/v1/embed"}'] == len(ok)
        assert m["moon3_batch_size_sum"] - 4 == len(ok)  # the warm-up batch (4) + each accepted item once
        assert s.proc.poll() is None and httpx.get(s.url + "/ready").status_code == 200
        assert took < 100
    finally:
        assert s.stop() == 0


def test_sigterm_drains_requests_in_flight_then_exits_0(engine_path):
    # a long batching wait keeps the requests queued when SIGTERM arrives
    s = Server(engine_path, "--max-batch", "32", "--max-wait-ms", "600")
    bodies = [{"items": [{"id": k, "title": TITLES[k % 8]}]} for k in range(12)]

    async def go():
        task = asyncio.ensure_future(_fire(s.url, bodies))
        await asyncio.sleep(0.25)
        s.proc.send_signal(signal.SIGTERM)
        return await task

    responses = asyncio.run(go())
    rc = s.stop()
    assert [getattr(r, "status_code", r) for r in responses] == [200] * 12
    assert [r.json()["data"][0]["id"] for r in responses] == list(range(12))
    assert rc == 0, s.output()
    assert "Traceback" not in s.output()


def test_a_repeated_sigterm_during_shutdown_still_exits_0(engine_path):
    # supervisors repeat their stop signal; one that lands after the drain, while the process tears
    # down, must not turn a clean exit into death by signal (status 143)
    s = Server(engine_path)
    assert httpx.post(s.url + "/v1/embed", json={"items": [{"title": TITLES[0]}]}).status_code == 200
    deadline = time.monotonic() + 30
    while s.proc.poll() is None and time.monotonic() < deadline:
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    rc = s.stop()
    assert rc == 0, s.output()
    assert "Traceback" not in s.output()


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_a_damaged_engine_refuses_to_start(engine_path, tmp_path, capsys, damage):
    from sdk.cli import main

    bad = tmp_path / "bad.engine"
    shutil.copy(engine_path, bad)
    data = bytearray(bad.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(EngineError):  # what the CLI reports
        from sdk.embedder import Embedder

        Embedder(bad)
    assert main(["serve", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}" in err and "listening" not in err


# ------------------------------------------------------------------ in process: /ready tells the truth


class Poisoned:
    """The tiny engine's embedder, except that a batch holding a title with "poison" fails in the
    engine (as a graph failing on one input would)."""

    def __init__(self, emb):
        self._emb = emb

    def __getattr__(self, name):
        return getattr(self._emb, name)

    def embed_batch(self, images, texts, traces, **kw):
        if any(t and "poison" in t for t in texts):
            raise EngineError("the embedder graph failed on inputs {...}: simulated")
        return self._emb.embed_batch(images, texts, traces, **kw)


@contextlib.asynccontextmanager
async def in_process(app):
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            for _ in range(600):
                if (await c.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            yield c


def test_ready_tells_the_truth_and_a_bad_item_never_poisons_later_requests(engine_path, reference):
    from sdk.embedder import Embedder
    from sdk.serve import ServeConfig, create_app

    app = create_app(ServeConfig(engine_path, max_batch=8, max_wait_ms=1),
                     Poisoned(Embedder(engine_path, threads=1)))
    tiny = photo(3, 1, 1)  # infinity #609: a 1x1 image broke every later request while /health said 200

    async def go():
        async with in_process(app) as c:
            out = {"ready0": (await c.get("/ready")).status_code}
            out["tiny"] = await c.post("/v1/embed", json={"items": [{"image": b64(tiny)}]})
            out["after_tiny"] = await c.post("/v1/embeddings", json={"input": TITLES[:2]})
            out["mixed"] = await c.post("/v1/embeddings", json={"input": ["poison one", TITLES[2]]})
            for _ in range(3):
                out["poison"] = await c.post("/v1/embeddings", json={"input": "poison"})
            out["ready_broken"] = await c.get("/ready")
            out["health_broken"] = (await c.get("/health")).status_code
            out["good"] = await c.post("/v1/embeddings", json={"input": TITLES[3]})
            out["ready_again"] = (await c.get("/ready")).status_code
            return out

    out = asyncio.run(go())
    assert out["ready0"] == 200
    assert out["tiny"].status_code == 200
    np.testing.assert_allclose(out["tiny"].json()["data"][0]["embedding"], reference.embed(images=[tiny])[0], atol=1e-6)
    assert out["after_tiny"].status_code == 200
    mixed = out["mixed"].json()
    assert out["mixed"].status_code == 207 and [d["index"] for d in mixed["data"]] == [1]
    np.testing.assert_allclose(mixed["data"][0]["embedding"], reference.embed(texts=[TITLES[2]])[0], atol=1e-6)
    assert mixed["errors"][0]["message"].startswith("item 0: the engine failed on this item")
    assert out["poison"].status_code == 422
    assert out["ready_broken"].status_code == 503
    assert "the engine failed on the last 3 batches" in out["ready_broken"].json()["status"]
    assert out["health_broken"] == 200  # alive, but not ready: both are true
    assert out["good"].status_code == 200 and out["ready_again"] == 200


class FakeReasoner:
    tasks = {"caption": "write the title", "attribute_qa": "what is the {key}"}

    def __init__(self):
        self.calls = []

    def generate_ids(self, image=None, text=None, task="trace", max_new_tokens=96, **fields):
        from sdk.preprocess import load_image

        if image is not None:
            load_image(image, name="image")  # InvalidInputError for a bad photo, as sdk.Reasoner
        self.calls.append((image, text, task, max_new_tokens, fields))
        return [7] * min(max_new_tokens, 3)

    def decode(self, ids):
        return f"{len(ids)} tokens"


def test_reason_endpoint(engine_path):
    from sdk.embedder import Embedder
    from sdk.serve import ServeConfig, create_app

    fake = FakeReasoner()
    app = create_app(ServeConfig(engine_path, max_batch=4), Embedder(engine_path, threads=1), fake)
    pic = photo(5)

    async def go():
        async with in_process(app) as c:
            return [await c.post("/v1/reason", json={"task": "caption", "title": "red shoe", "image": b64(pic)}),
                    await c.post("/v1/reason", json={"task": "attribute_qa", "title": "red shoe", "key": "colour",
                                                     "max_new_tokens": 2}),
                    await c.post("/v1/reason", data={"task": "caption"}, files={"image": ("p.png", pic, "image/png")}),
                    await c.post("/v1/reason", json={"task": "poem", "title": "x"}),
                    await c.post("/v1/reason", json={"task": "caption", "max_new_tokens": 0, "title": "x"}),
                    await c.post("/v1/reason", json={"task": "caption", "image": b64(b"junk")})]

    ok, qa, multi, bad_task, bad_budget, bad_photo = asyncio.run(go())
    assert ok.status_code == 200 and ok.json()["text"] == "3 tokens" and ok.json()["task"] == "caption"
    assert fake.calls[0][2:4] == ("caption", 1)  # the warm-up
    assert fake.calls[1] == (pic, "red shoe", "caption", 96, {})
    assert qa.status_code == 200 and qa.json()["tokens"] == 2
    assert any(c[4] == {"key": "colour"} for c in fake.calls)
    assert multi.status_code == 200
    assert bad_task.status_code == 400 and "task must be one of ['attribute_qa', 'caption']" in bad_task.text
    assert bad_budget.status_code == 400 and "max_new_tokens must be an int in [1, 256]" in bad_budget.text
    assert bad_photo.status_code == 400 and bad_photo.json()["error"]["message"].startswith("image: ")
