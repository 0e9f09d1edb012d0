"""Dynamic batching for `moon3 serve`: concurrent requests' items merged into engine batches.

Each request's items join one FIFO queue. A single worker takes up to `max_batch` items, waiting
for more to come at most `max_wait_s` after the oldest queued item arrived or the engine finished
its last batch (whichever is later), runs the batch in one engine thread (off the event loop), and
hands every item its vector or its error; a request's future resolves when its last item is done.
While the engine runs a batch, new items queue up; when it finishes, the clients it just answered
get up to `max_wait_s` to send their next items, so under load batches stay full (32 clients give
batches of 32, not batches alternating between the items that waited and those just answered).

The queue is bounded in items: a request that does not fit is refused whole (`QueueFull`, with a
retry estimate), so memory never grows with the offered load. A batch that fails in the engine
is retried item by item, so the item that broke it gets the error and the others their vectors;
the worker never stops on an error.

Plain asyncio and a thread: no web framework here (`sdk.serve` puts HTTP around it). Never
imports torch.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sdk.errors import SdkError

__all__ = ["BatchItem", "DynamicBatcher", "ItemResult", "QueueFull"]

_ITEM_PREFIX = re.compile(r"^item \d+")


class QueueFull(SdkError):
    """The batcher's queue cannot take a request now; `retry_after` is an estimate in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class BatchItem:
    """One product to embed: encoded photo bytes and/or a title and/or a trace (None = absent).
    `count_tokens`: report its tokens in `ItemResult.tokens` (OpenAI `usage`; tokenizes it again)."""

    image: bytes | None = None
    text: str | None = None
    trace: str | None = None
    count_tokens: bool = True


@dataclass
class ItemResult:
    """What one item got: a full-width vector, or the error message (naming the item's index in
    its own request), and the modalities cut to the token budget."""

    vector: np.ndarray | None = None
    error: str | None = None
    truncated: tuple[str, ...] = ()
    tokens: int = 0  # tokens of its title and trace (OpenAI `usage`)


@dataclass
class _Request:
    items: list[BatchItem]
    labels: list[int]  # how error messages number each item (its index in the client's request)
    future: asyncio.Future
    enqueued: float
    results: list[ItemResult | None] = field(default_factory=list)
    left: int = 0


@dataclass
class _Slot:
    request: _Request
    index: int  # the item's index in its request
    enqueued: float


class DynamicBatcher:
    """Merges items of concurrent requests into engine batches.

    Args:
        embedder: an `sdk.Embedder` (its `embed_batch` is called from one worker thread).
        max_batch: most items per engine batch.
        max_wait_s: longest time a batch waits to fill, counted from when its oldest item arrived
            or the engine finished the previous batch, whichever is later.
        max_queue: most items waiting (not yet in a running batch); more are refused.
        observe: optional callback `observe(event, value)` for metrics: "batch" (size),
            "engine_s", "queue_wait_s", "queue" (depth), "engine_error" (message).

    Use from one event loop: `start()`, `await submit(items)`, `await stop()`.
    """

    def __init__(self, embedder: Any, max_batch: int, max_wait_s: float, max_queue: int,
                 observe: Callable[[str, Any], None] | None = None):
        if max_batch < 1 or max_queue < max_batch or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= max_batch and max_wait_s >= 0; got "
                             f"max_batch {max_batch}, max_queue {max_queue}, max_wait_s {max_wait_s}")
        self.embedder = embedder
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._observe = observe or (lambda event, value: None)
        self._queue: deque[_Slot] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moon3-engine")
        self._stopping = False
        self._rate = 0.0  # items/s of recent batches (exponential average), for Retry-After
        self.engine_failures_in_row = 0  # batches whose every item failed in the engine
        self._idle_since = 0.0
        self.batches = 0
        self.last_batch_sizes: deque[int] = deque(maxlen=1024)  # for tests and /metrics-free checks

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wakeup = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name="moon3-batcher")

    @property
    def alive(self) -> bool:
        """The worker is running (it only ends after `stop`)."""
        return self._worker is not None and not self._worker.done()

    @property
    def depth(self) -> int:
        """Items waiting in the queue."""
        return len(self._queue)

    async def stop(self, drain: bool = True) -> None:
        """Stop taking requests; with `drain`, finish every queued item first, else fail them."""
        self._stopping = True
        if not drain:
            while self._queue:
                slot = self._queue.popleft()
                if not slot.request.future.done():
                    slot.request.future.set_exception(SdkError("the server is shutting down"))
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ requests

    def retry_after(self, extra: int = 0) -> int:
        """Seconds until the queue should have room for `extra` more items (>= 1)."""
        backlog = len(self._queue) + extra
        return max(1, math.ceil(backlog / self._rate)) if self._rate > 0 else 1

    async def submit(self, items: list[BatchItem], labels: list[int] | None = None) -> list[ItemResult]:
        """Queue a request's items and wait for all of their results (in order).

        Args:
            items: the request's items to embed.
            labels: the index each item has in the client's request, for error messages ("item 3
                image: ..."); default 0..n-1.

        Raises:
            QueueFull: the queue has no room for all the items (nothing was queued).
            SdkError: the batcher is stopping.
        """
        if self._stopping:
            raise SdkError("the server is shutting down")
        if not items:
            return []
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFull(f"the queue is full ({len(self._queue)} of {self.max_queue} items waiting); "
                            f"retry later", self.retry_after(len(items)))
        now = time.perf_counter()
        req = _Request(items, list(range(len(items))) if labels is None else list(labels),
                       asyncio.get_running_loop().create_future(), now, [None] * len(items), len(items))
        self._queue.extend(_Slot(req, i, now) for i in range(len(items)))
        self._observe("queue", len(self._queue))
        self._wakeup.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            # the client went away: its items still queued are dropped when the worker meets them
            req.left = -1
            raise

    # ------------------------------------------------------------------ worker

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # wait for the batch to fill, at most max_wait_s after its oldest item arrived or the
            # engine became free, whichever is later: the requests answered by the last batch come
            # back within that time, so under load batches stay full rather than alternating between
            # the part that waited and the part that was just answered
            deadline = max(self._queue[0].enqueued, self._idle_since) + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch: list[_Slot] = []
            while self._queue and len(batch) < self.max_batch:
                slot = self._queue.popleft()
                if slot.request.left >= 0 and not slot.request.future.done():  # dropped: cancelled request
                    batch.append(slot)
            self._observe("queue", len(self._queue))
            if not batch:
                continue
            t0 = time.perf_counter()
            for slot in batch:
                self._observe("queue_wait_s", t0 - slot.enqueued)
            try:
                results = await loop.run_in_executor(self._pool, self._run, [s.request.items[s.index] for s in batch])
            except Exception as exc:  # noqa: BLE001 - a bug here must fail these requests, not the worker
                results = [ItemResult(error=f"item 0: internal error: {type(exc).__name__}: {exc}")] * len(batch)
            self._idle_since = time.perf_counter()
            dt = self._idle_since - t0
            self.batches += 1
            self.last_batch_sizes.append(len(batch))
            self._observe("batch", len(batch))
            self._observe("engine_s", dt)
            rate = len(batch) / max(dt, 1e-6)
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
            for slot, res in zip(batch, results):
                req = slot.request
                if res.error is not None:
                    res = ItemResult(error=_renumber(res.error, req.labels[slot.index]))
                req.results[slot.index] = res
                req.left -= 1
                if req.left == 0 and not req.future.done():
                    req.future.set_result(req.results)

    def _run(self, items: list[BatchItem]) -> list[ItemResult]:
        """One engine batch (worker thread). Item errors name the item's index in this batch."""
        try:
            return self._embed(items)
        except Exception as exc:  # noqa: BLE001 - an engine failure: find the item that caused it
            if len(items) == 1:
                self._engine_failed(exc, whole=True)
                return [ItemResult(error=f"item 0: the engine failed on this item: {exc}")]
        out: list[ItemResult] = []
        failed = 0
        for item in items:
            try:
                out.extend(self._embed([item]))
            except Exception as exc:  # noqa: BLE001
                failed += 1
                out.append(ItemResult(error=f"item 0: the engine failed on this item: {exc}"))
                self._observe("engine_error", str(exc))
        self._engine_failed(None, whole=failed == len(items))
        return out

    def _engine_failed(self, exc: Exception | None, whole: bool) -> None:
        if exc is not None:
            self._observe("engine_error", str(exc))
        self.engine_failures_in_row = self.engine_failures_in_row + 1 if whole else 0

    def _embed(self, items: list[BatchItem]) -> list[ItemResult]:
        emb = self.embedder
        res = emb.embed_batch([it.image for it in items], [it.text for it in items], [it.trace for it in items],
                              batch_size=self.max_batch)
        self.engine_failures_in_row = 0
        tokens = _token_counts(emb, items)
        out = []
        for i in range(len(items)):
            if i in res.errors:
                out.append(ItemResult(error=res.errors[i]))
            else:
                out.append(ItemResult(vector=res.vectors[i], truncated=res.truncated.get(i, ()), tokens=tokens[i]))
        return out


def _renumber(msg: str, index: int) -> str:
    """A message about item i of an engine batch ("item 7 image: ...") about item `index` of its request."""
    return _ITEM_PREFIX.sub(f"item {index}", msg, count=1)


def _token_counts(emb: Any, items: list[BatchItem]) -> list[int]:
    """Tokens of each item's title and trace, as the engine's tokenizers cut them (OpenAI `usage`);
    0 for items that do not ask (`count_tokens=False`)."""
    count = getattr(emb, "count_tokens", None)
    counts = [0] * len(items)
    for which, get in (("text", lambda it: it.text), ("trace", lambda it: it.trace)):
        idx = [i for i, it in enumerate(items) if it.count_tokens and isinstance(get(it), str) and get(it).strip()]
        if count is None or not idx:
            continue
        for i, n in zip(idx, count([get(items[i]) for i in idx], which)):
            counts[i] += n
    return counts
