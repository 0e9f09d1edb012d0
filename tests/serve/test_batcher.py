"""sdk.serve.batch.DynamicBatcher on a fake engine: merging, the wait bound, the queue bound,
engine failures isolated to the item that caused them, draining."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from sdk.embedder import Embeddings
from sdk.serve.batch import BatchItem, DynamicBatcher, QueueFull


class FakeEmbedder:
    """Vector of an item = a function of its title; "bad" titles are item errors; a batch holding a
    "poison" title makes the whole engine call fail (as a graph failing on one input would)."""

    dim = 4

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, []

    def embed_batch(self, images, texts, traces, batch_size=32):
        self.calls.append(list(texts))
        time.sleep(self.delay)
        if any(t and "poison" in t for t in texts):
            raise RuntimeError("graph failed")
        vecs = np.array([[len(t or ""), 1, 0, 0] for t in texts], np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        errors = {i: f"item {i} text: bad title" for i, t in enumerate(texts) if t == "bad"}
        vecs[list(errors)] = np.nan
        return Embeddings(vecs, errors, {})


def run(coro):
    return asyncio.run(coro)


async def _with(batcher, body):
    batcher.start()
    try:
        return await body()
    finally:
        await batcher.stop()


def test_concurrent_requests_merge_into_full_batches():
    fake = FakeEmbedder()
    b = DynamicBatcher(fake, max_batch=8, max_wait_s=0.2, max_queue=64)

    async def body():
        return await asyncio.gather(*(b.submit([BatchItem(text="x" * (k + 1))]) for k in range(20)))

    results = run(_with(b, body))
    assert [len(c) for c in fake.calls] == [8, 8, 4]
    for k, (res,) in enumerate(results):  # each request got its own item's vector back
        assert res.error is None and res.vector[0] == pytest.approx((k + 1) / np.hypot(k + 1, 1))


def test_a_lone_request_waits_at_most_max_wait():
    for wait in (0.0, 0.15):
        b = DynamicBatcher(FakeEmbedder(), max_batch=8, max_wait_s=wait, max_queue=64)

        async def body():
            t0 = time.perf_counter()
            await b.submit([BatchItem(text="a")])
            return time.perf_counter() - t0

        took = run(_with(b, body))
        assert wait <= took < wait + 0.5


def test_a_large_request_spans_batches_and_keeps_its_order():
    fake = FakeEmbedder()
    b = DynamicBatcher(fake, max_batch=4, max_wait_s=0.0, max_queue=64)
    res = run(_with(b, lambda: b.submit([BatchItem(text="x" * (k + 1)) for k in range(10)])))
    assert [len(c) for c in fake.calls] == [4, 4, 2]
    assert [r.vector[0] for r in res] == pytest.approx([(k + 1) / np.hypot(k + 1, 1) for k in range(10)])


def test_clients_just_answered_get_max_wait_to_come_back_so_batches_stay_full():
    """8 clients, each sending its next item as soon as it has its answer; 4 of them start while the
    engine runs the first 4. The batch after that waits (at most max_wait) for the 4 just answered,
    so every later batch holds all 8, rather than batches of 4 alternating for ever."""
    fake = FakeEmbedder(delay=0.2)  # the first batch runs from 0.05 s to 0.25 s
    b = DynamicBatcher(fake, max_batch=8, max_wait_s=0.05, max_queue=64)

    async def client(k: int, start: float):
        await asyncio.sleep(start)
        for n in range(4):
            (res,) = await b.submit([BatchItem(text=f"c{k} n{n}")])
            assert res.error is None

    async def body():
        await asyncio.gather(*(client(k, 0.0 if k < 4 else 0.15) for k in range(8)))

    run(_with(b, body))
    sizes = [len(c) for c in fake.calls]
    assert sizes[0] == 4 and sizes[1:] == [8, 8, 8, 4], sizes


def test_a_full_queue_refuses_the_whole_request_with_a_retry_estimate():
    fake = FakeEmbedder(delay=0.3)
    b = DynamicBatcher(fake, max_batch=8, max_wait_s=0.0, max_queue=8)

    async def body():
        first = asyncio.ensure_future(b.submit([BatchItem(text="a")] * 8))
        await asyncio.sleep(0.1)  # the worker took these 8: the queue is empty again
        second = asyncio.ensure_future(b.submit([BatchItem(text="b")] * 8))
        await asyncio.sleep(0.01)
        assert b.depth == 8
        with pytest.raises(QueueFull, match=r"queue is full \(8 of 8") as exc:
            await b.submit([BatchItem(text="c")])
        assert exc.value.retry_after >= 1
        return await first, await second

    a, c = run(_with(b, body))
    assert len(a) == len(c) == 8 and all(r.error is None for r in a + c)
    assert sum(len(x) for x in fake.calls) == 16  # the refused item never ran


def test_engine_failure_is_isolated_to_the_item_that_caused_it():
    fake = FakeEmbedder()
    b = DynamicBatcher(fake, max_batch=8, max_wait_s=0.05, max_queue=64)

    async def body():
        reqs = [b.submit([BatchItem(text="good one"), BatchItem(text="bad")], labels=[3, 5]),
                b.submit([BatchItem(text="poison pill")], labels=[2]),
                b.submit([BatchItem(text="fine")])]
        out = await asyncio.gather(*reqs)
        later = await b.submit([BatchItem(text="after")])
        return out, later

    (first, poisoned, fine), later = run(_with(b, body))
    assert first[0].error is None and first[0].vector is not None
    assert first[1].error == "item 5 text: bad title"  # renumbered to the client's index
    assert poisoned[0].error.startswith("item 2: the engine failed on this item: graph failed")
    assert fine[0].error is None and later[0].error is None
    assert b.engine_failures_in_row == 0


def test_consecutive_whole_batch_failures_are_counted_and_reset():
    b = DynamicBatcher(FakeEmbedder(), max_batch=8, max_wait_s=0.0, max_queue=64)

    async def body():
        for _ in range(3):
            await b.submit([BatchItem(text="poison")])
        failed = b.engine_failures_in_row
        await b.submit([BatchItem(text="ok")])
        return failed, b.engine_failures_in_row

    assert run(_with(b, body)) == (3, 0)


def test_stop_drains_queued_items_and_then_refuses():
    fake = FakeEmbedder(delay=0.05)
    b = DynamicBatcher(fake, max_batch=2, max_wait_s=0.0, max_queue=64)

    async def body():
        b.start()
        pending = [asyncio.ensure_future(b.submit([BatchItem(text=f"t{k}")])) for k in range(6)]
        await asyncio.sleep(0.01)
        await b.stop(drain=True)
        assert all(p.done() and p.result()[0].error is None for p in pending)
        with pytest.raises(Exception, match="shutting down"):
            await b.submit([BatchItem(text="late")])

    run(body())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_queue >= max_batch"):
        DynamicBatcher(FakeEmbedder(), max_batch=8, max_wait_s=0.0, max_queue=4)
