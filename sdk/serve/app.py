"""The `moon3 serve` application: settings, server state and metrics, the endpoints, warm-up.

`sdk.serve` runs it under uvicorn; `create_app` alone gives the Starlette app (tests drive it with
httpx). The web stack and prometheus-client are imported when an app is created. Never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from sdk.errors import InvalidInputError, SdkError
from sdk.serve.batch import BatchItem, DynamicBatcher, ItemResult, QueueFull
from sdk.serve.parsing import (
    EMBED_FIELDS,
    ERROR_TYPES,
    REASON_FIELDS,
    HttpError,
    decode_image,
    dims,
    dumps,
    encoding,
    kind,
    need_serve_extra,
    parse_openai_input,
    parse_products,
    read_request,
    text_field,
    unknown_fields,
    vector_out,
)
from sdk.serve.state import Metrics, ServeConfig, ServerState

__all__ = ["create_app", "warmup_items"]

log = logging.getLogger("moon3.serve")



async def _embed_items(items: list, errors: dict[int, str], state: ServerState) -> list[ItemResult]:
    """Run the good items through the batcher; every item's result (bad ones: their error)."""
    good = [i for i, it in enumerate(items) if it is not None and i not in errors]
    if state.draining:
        raise HttpError(503, "the server is shutting down", kind="draining", headers={"Retry-After": "1"})
    try:
        done = await state.batcher.submit([items[i] for i in good], labels=good)
    except QueueFull as exc:
        raise HttpError(429, str(exc), kind="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
    except SdkError as exc:  # the batcher is stopping
        raise HttpError(503, str(exc), kind="draining", headers={"Retry-After": "1"}) from None
    out: list[ItemResult] = [ItemResult(error=errors.get(i)) for i in range(len(items))]
    for i, res in zip(good, done):
        out[i] = res
    return out


def _status(results: list[ItemResult]) -> int:
    bad = sum(r.error is not None for r in results)
    return 200 if bad == 0 else 207 if bad < len(results) else 422


# ----------------------------------------------------------------------------------- app


class _Endpoints:
    """The app's request handlers over one server state; `wrap` gives each the common handling."""

    def __init__(self, state: ServerState, response: Any):
        self.state, self.metrics, self.config = state, state.metrics, state.config
        self._response = response  # starlette.responses.Response
        self._item_counters: dict[tuple[str, str], Any] = {}  # labelled children, made on first use

    def json(self, payload: Any, status: int = 200, headers: dict | None = None) -> Any:
        return self._response(dumps(payload), status, headers=headers, media_type="application/json")

    def wrap(self, name: str, fn: Any) -> Any:
        """Common handling: metrics, HTTP errors as OpenAI-style error bodies, no crash on a bug."""
        metrics, state = self.metrics, self.state
        latency = metrics.latency.labels(name)  # labelled children looked up once, not per request
        requests: dict[int, Any] = {}

        async def handler(request):
            t0 = time.perf_counter()
            state.inflight += 1
            try:
                resp = await fn(request)
            except HttpError as exc:
                metrics.errors.labels(exc.kind).inc()
                resp = self.json({"error": {"message": str(exc), "type": ERROR_TYPES.get(exc.status, "error"),
                                            "param": exc.param, "code": exc.status}}, exc.status, exc.headers)
            except Exception as exc:  # noqa: BLE001 - a bug answers 500 and the server goes on
                log.exception("internal error on %s", name)
                metrics.errors.labels("internal").inc()
                resp = self.json({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                            "type": "server_error", "param": None, "code": 500}}, 500)
            finally:
                state.inflight -= 1
            code = resp.status_code
            counter = requests.get(code)
            if counter is None:
                counter = requests[code] = metrics.requests.labels(name, str(code))
            counter.inc()
            latency.observe(time.perf_counter() - t0)
            return resp

        return handler

    def count_items(self, name: str, results: list[ItemResult]) -> None:
        bad = sum(r.error is not None for r in results)
        for outcome, n in (("bad", bad), ("ok", len(results) - bad)):
            if n:
                counter = self._item_counters.get((name, outcome))
                if counter is None:
                    counter = self._item_counters[name, outcome] = self.metrics.items.labels(name, outcome)
                counter.inc(n)
        if bad:
            self.metrics.errors.labels("bad_item").inc(bad)

    async def _read(self, request: Any) -> tuple[dict, dict[str, bytes] | None]:
        return await read_request(request, self.config.max_body_bytes, self.config.max_items)

    async def openai_embeddings(self, request):
        state = self.state
        fields, _ = await self._read(request)
        if "input" not in fields:
            raise HttpError(400, "missing field 'input' (a string or an array of strings)", param="input")
        dim, enc = dims(fields.get("dimensions"), state.embedder), encoding(fields.get("encoding_format"))
        items, errors = parse_openai_input(fields["input"], self.config.max_items)
        results = await _embed_items(items, errors, state)
        self.count_items("/v1/embeddings", results)
        data = [{"object": "embedding", "index": i, "embedding": vector_out(r.vector, dim, enc)}
                for i, r in enumerate(results) if r.error is None]
        tokens = sum(r.tokens for r in results)
        payload = {"object": "list", "data": data, "model": state.model,
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        status = _status(results)
        if status != 200:
            payload["errors"] = [{"index": i, "message": r.error} for i, r in enumerate(results) if r.error]
            if status == 422:
                payload["error"] = {"message": f"no input could be embedded: {results[0].error}",
                                    "type": "invalid_request_error", "param": "input", "code": 422}
        return self.json(payload, status)

    async def embed(self, request):
        state = self.state
        fields, files = await self._read(request)
        unknown_fields(fields, EMBED_FIELDS if files is None else (*EMBED_FIELDS, "id", "title", "trace"), "the request")
        dim, enc = dims(fields.get("dimensions"), state.embedder), encoding(fields.get("encoding_format"))
        items, errors, ids = parse_products(fields, files, self.config.max_items)
        results = await _embed_items(items, errors, state)
        self.count_items("/v1/embed", results)
        data = []
        for i, r in enumerate(results):
            if r.error is None:
                row = {"index": i, "id": ids[i], "embedding": vector_out(r.vector, dim, enc)}
                if r.truncated:
                    row["truncated"] = list(r.truncated)
                data.append(row)
        payload = {"object": "list", "model": state.model, "dimensions": dim or state.embedder.dim, "data": data}
        status = _status(results)
        if status != 200:
            payload["errors"] = [{"index": i, "id": ids[i], "message": r.error}
                                 for i, r in enumerate(results) if r.error]
        return self.json(payload, status)

    async def reason(self, request):
        state, config, r = self.state, self.config, self.state.reasoner
        if r is None:
            raise HttpError(404, f"{state.model}: this server has no reasoner (the engine has none, or the server "
                                 "was started with --no-reasoner)", kind="no_reasoner")
        fields, files = await self._read(request)
        task, title, image, budget, extra = _reason_request(fields, files or {}, r.tasks, config.max_new_tokens)
        if state.draining:
            raise HttpError(503, "the server is shutting down", kind="draining", headers={"Retry-After": "1"})
        if state.reason_pending >= config.reason_queue:
            raise HttpError(429, f"{state.reason_pending} reasoner requests are waiting or running "
                                 f"(--reason-queue {config.reason_queue}); retry later", kind="queue_full",
                            headers={"Retry-After": "1"})
        state.reason_pending += 1
        try:
            def run():
                t0 = time.perf_counter()
                ids = r.generate_ids(image=image, text=title, task=task, max_new_tokens=budget, **extra)
                return r.decode(ids), len(ids), time.perf_counter() - t0

            text, n, dt = await asyncio.get_running_loop().run_in_executor(state.reason_pool, run)
        except InvalidInputError as exc:
            raise HttpError(400, str(exc)) from None
        finally:
            state.reason_pending -= 1
        return self.json({"object": "reasoning", "model": state.model, "task": task, "text": text,
                          "tokens": n, "seconds": round(dt, 4)})

    async def health(self, request):
        return self.json({"status": "ok"})

    async def ready(self, request):
        state = self.state
        ok, why = state.readiness()
        self.metrics.ready.set(1 if ok else 0)
        b, emb = state.batcher, state.embedder
        return self.json({"ready": ok, "status": why, "model": state.model, "precision": emb.precision,
                          "backend": emb.backend, "batch_invariant": emb.batch_invariant, "dim": emb.dim,
                          "queue": b.depth if b else 0, "reasoner": state.reasoner is not None}, 200 if ok else 503)

    async def metrics_text(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        ok, _ = self.state.readiness()
        self.metrics.ready.set(1 if ok else 0)
        return self._response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request):
        state, emb = self.state, self.state.embedder
        return self.json({"object": "list", "data": [
            {"id": state.model, "object": "model", "owned_by": "moon3-sdk", "created": 0, "dim": emb.dim,
             "matryoshka_dims": list(emb.matryoshka_dims), "precision": emb.precision}]})

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        from concurrent.futures import ThreadPoolExecutor

        state, config = self.state, self.config

        def observe(event: str, value: Any) -> None:
            if event == "engine_error":
                state.last_engine_error = str(value)[:500]
            self.metrics.observe(event, value)

        state.batcher = DynamicBatcher(state.embedder, config.max_batch, config.max_wait_ms / 1000, config.queue,
                                       observe)
        state.batcher.start()
        state.reason_pool = ThreadPoolExecutor(1, thread_name_prefix="moon3-reasoner")
        state.tasks.append(asyncio.get_running_loop().create_task(_warm_up(state)))
        try:
            yield
        finally:
            state.draining = True
            for t in state.tasks:
                if not t.done():
                    t.cancel()
            await state.batcher.stop(drain=True)
            state.reason_pool.shutdown(wait=True)
            state.embedder.close()


def _reason_request(fields: dict, files: dict[str, bytes], tasks: Any, max_new_tokens: int
                    ) -> tuple[str, str | None, bytes | None, int, dict[str, str]]:
    """/v1/reason fields -> (task, title, photo bytes, token budget, key/question)."""
    unknown_fields(fields, REASON_FIELDS, "the request")
    task = fields.get("task", "caption")
    if not isinstance(task, str) or task not in tasks:
        raise HttpError(400, f"task must be one of {sorted(tasks)}, got {task!r}", param="task")
    try:
        title = text_field(fields.get("title"), "title")
    except InvalidInputError as exc:
        raise HttpError(400, str(exc), param="title") from None
    try:
        image = files.get("image") if "image" in files else (
            decode_image(fields["image"], "image") if fields.get("image") is not None else None)
    except InvalidInputError as exc:
        raise HttpError(400, str(exc), param="image") from None
    budget = fields.get("max_new_tokens", 96)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= max_new_tokens:
        raise HttpError(400, f"max_new_tokens must be an int in [1, {max_new_tokens}], got {budget!r}",
                        param="max_new_tokens")
    extra = {k: fields[k] for k in ("key", "question") if fields.get(k) is not None}
    for k, v in extra.items():
        if not isinstance(v, str):
            raise HttpError(400, f"{k} must be a string, got {kind(v)}", param=k)
    return task, title, image, budget, extra


def create_app(config: ServeConfig, embedder: Any, reasoner: Any = None) -> Any:
    """The Starlette application of `moon3 serve` around a loaded `sdk.Embedder`.

    Args:
        config: the server settings (engine, host and port are only reported).
        embedder: an `sdk.Embedder` (the app closes it at shutdown).
        reasoner: an `sdk.Reasoner` for /v1/reason, or None (the endpoint answers 404).

    Returns:
        A Starlette app; its lifespan starts the batcher and the warm-up and drains at shutdown.

    Raises:
        BackendUnavailableError: starlette or prometheus-client is not installed.
    """
    try:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route
    except ImportError as exc:
        raise need_serve_extra(exc) from exc

    metrics = Metrics()
    state = ServerState(config, embedder, reasoner, metrics, config.model_name or Path(str(config.engine)).stem)
    # read when /metrics is scraped, not kept up to date on every request
    metrics.inflight.set_function(lambda: state.inflight)
    metrics.queue.set_function(lambda: state.batcher.depth if state.batcher is not None else 0)
    ep = _Endpoints(state, Response)
    hot = {path: ep.wrap(path, fn) for path, fn in (("/v1/embeddings", ep.openai_embeddings), ("/v1/embed", ep.embed))}
    routes = [
        Route("/v1/embeddings", hot["/v1/embeddings"], methods=["POST"]),
        Route("/v1/embed", hot["/v1/embed"], methods=["POST"]),
        Route("/v1/reason", ep.wrap("/v1/reason", ep.reason), methods=["POST"]),
        Route("/v1/models", ep.models, methods=["GET"]),
        Route("/health", ep.health, methods=["GET"]),
        Route("/ready", ep.ready, methods=["GET"]),
        Route("/metrics", ep.metrics_text, methods=["GET"]),
    ]

    class App(Starlette):
        async def __call__(self, scope, receive, send):
            # The embedding endpoints skip Starlette's middleware and route matching (their handler
            # already turns every error into a response): tens of microseconds a request, which a
            # 2-core box running the engine too feels. Everything else takes the usual path.
            if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
                handler = hot.get(scope["path"])
                if handler is not None:
                    scope["app"] = self
                    response = await handler(Request(scope, receive, send))
                    await response(scope, receive, send)
                    return
            await super().__call__(scope, receive, send)

    app = App(routes=routes, lifespan=ep.lifespan)
    app.state.moon3 = state
    return app


def warmup_items(n: int, size: int, text_tokens: int) -> list[BatchItem]:
    """`n` items with a photo and a title over the token budget: the largest shapes the engine will
    see, so ONNX Runtime's memory arena reaches its size before the first request."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    title = " ".join(["warm"] * (text_tokens + 2))
    return [BatchItem(buf.getvalue(), title, None) for _ in range(n)]


async def _warm_up(state: ServerState) -> None:
    """Run the largest batch once through the engine (and the reasoner one step), then mark ready."""
    emb, b = state.embedder, state.batcher
    try:
        size = int(emb.manifest["preprocess"]["image"]["size"])
        tokens = int(emb.manifest["preprocess"]["text"]["max_length"])
        for res in await b.submit(warmup_items(state.config.max_batch, size, tokens)):
            if res.error is not None:
                raise SdkError(res.error)
        if state.reasoner is not None:
            task = "caption" if "caption" in state.reasoner.tasks else sorted(state.reasoner.tasks)[0]
            await asyncio.get_running_loop().run_in_executor(
                state.reason_pool, lambda: state.reasoner.generate_ids(text="warm up", task=task, max_new_tokens=1))
        state.warmed = True
        log.info("moon3 serve: engine warmed up (batch of %d)", state.config.max_batch)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported by /ready
        state.warmup_error = f"{type(exc).__name__}: {exc}"
        log.error("moon3 serve: warm-up failed: %s", state.warmup_error)
