"""`moon3 serve`: an HTTP embedding server on a `moon3.engine`, with dynamic batching.

    moon3 serve moon3.engine --port 8000              # needs `pip install 'moon3-sdk[serve]'`
    curl -s localhost:8000/v1/embeddings -H 'content-type: application/json' \\
         -d '{"model": "moon3", "input": ["Women Black Handbag"], "dimensions": 64}'

Endpoints (docs/serve.md has them in full):
  * POST /v1/embeddings: OpenAI-compatible text embeddings (`input`, `dimensions`,
    `encoding_format` "float" | "base64").
  * POST /v1/embed: products, each a photo (base64 in JSON, or a multipart file part; the server
    never fetches a URL and never opens a path) and/or a title and/or a trace, with optional ids.
  * POST /v1/reason: the engine's reasoner tasks (caption, category, attributes, ...).
  * GET /health (the process answers), /ready (engine loaded, warmed, batch worker alive, engine
    not failing, not draining), /metrics (Prometheus text), /v1/models.

Items of concurrent requests are merged into engine batches by `sdk.serve_batch.DynamicBatcher`;
a bad item is reported by index (HTTP 207 when some items of a request were good, 422 when none
was) and never costs the good ones or later requests. A full queue answers 429 with Retry-After.
SIGTERM stops accepting connections, finishes the requests in flight, then exits.

The web stack is Starlette on uvicorn, imported only when a server is created: `import sdk`
and `import sdk.serve` work without the [serve] extra. Never imports torch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sdk.errors import BackendUnavailableError, InvalidInputError, SdkError
from sdk.ops import check_dim, l2_normalize
from sdk.serve_batch import BatchItem, DynamicBatcher, ItemResult, QueueFull

__all__ = ["ServeConfig", "create_app", "serve"]

log = logging.getLogger("moon3.serve")

ENCODINGS = ("float", "base64")
ITEM_FIELDS = ("id", "title", "image", "image_file", "trace")
EMBED_FIELDS = ("items", "dimensions", "encoding_format")
# the request fields the OpenAI embeddings API defines; `model` and `user` are accepted and ignored
OPENAI_FIELDS = ("input", "model", "dimensions", "encoding_format", "user")
REASON_FIELDS = ("task", "title", "image", "key", "question", "max_new_tokens")
ENGINE_FAILURES_NOT_READY = 3  # batches in a row failing in the engine before /ready says 503
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _need_serve_extra(exc: ImportError) -> BackendUnavailableError:
    return BackendUnavailableError(f"`moon3 serve` needs the web stack ({exc}): pip install 'moon3-sdk[serve]'")


try:  # optional ([serve] extra): JSON in and out in a few microseconds instead of ~0.3 ms a vector
    import orjson as _orjson
except ImportError:  # pragma: no cover - the standard library does the same, slower
    _orjson = None


def dumps(payload: Any) -> bytes:
    """A response body: compact UTF-8 JSON (orjson when installed, else the standard library)."""
    if _orjson is not None:
        try:
            return _orjson.dumps(payload)
        except TypeError:  # orjson.JSONEncodeError: an int over 64 bits, a lone surrogate, ...
            pass
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def loads(body: bytes | str) -> Any:
    """A request body's JSON, as `json.loads` gives it. orjson parses what it can; what it refuses
    (NaN, UTF-16, bad JSON) goes to the standard library, which accepts or raises as before, and
    so does a body where orjson read an integer beyond 64 bits as a float (an id of 2**70)."""
    if _orjson is not None:
        try:
            data = _orjson.loads(body)
        except ValueError:  # orjson.JSONDecodeError
            pass
        else:
            if not _has_huge_float(data):
                return data
    return json.loads(body)


def _has_huge_float(value: Any) -> bool:
    """Whether parsed JSON holds a float of magnitude >= 2**63 (where orjson turns integers into floats)."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is float:
            if not -_HUGE < v < _HUGE:
                return True
        elif t is dict:
            stack.extend(v.values())
        elif t is list:
            stack.extend(v)
    return False


_HUGE = 2.0**63


def default_threads() -> int:
    """ONNX Runtime intra-op threads when --threads is not given: the physical cores this process
    may use, less one left for the HTTP event loop (at least 1). With every core in the engine's
    pool, the event loop preempts a pool thread in each batch and the others spin at the barrier."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores) - 1)


@dataclass
class ServeConfig:
    """Settings of `moon3 serve` (the CLI flags of the same names).

    Attributes:
        engine: the `moon3.engine` file.
        host, port: where to listen (port 0: any free port, printed at start).
        max_batch: most items per engine batch.
        max_wait_ms: longest wait of a queued item for its batch to fill.
        queue: most items waiting for the engine; a request that does not fit gets 429.
        max_items: most items in one request (413 above it); at most `queue`.
        max_body_mb: largest request body in MiB (413 above it).
        reason_queue: most /v1/reason requests waiting or running at once (429 above it).
        max_new_tokens: the most tokens a /v1/reason answer may ask for.
        drain_s: on SIGTERM, how long to wait for requests in flight before exiting anyway.
        threads: ONNX Runtime intra-op threads (None: `default_threads()`, the physical cores less
            one for the event loop).
        providers: backend names as `sdk.Embedder(providers=...)`.
        reasoner: load the engine's reasoner (if it has one) for /v1/reason.
        model_name: the name /v1/models and responses report (default: the engine file's stem).
        log_level: uvicorn's log level; access_log: one log line per request.
    """

    engine: str | os.PathLike
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue: int = 1024
    max_items: int = 256
    max_body_mb: float = 32.0
    reason_queue: int = 16
    max_new_tokens: int = 256
    drain_s: float = 30.0
    threads: int | None = None
    providers: Sequence[str] | None = None
    reasoner: bool = True
    model_name: str | None = None
    log_level: str = "info"
    access_log: bool = False

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, integer: bool = True, zero: bool = False) -> None:
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or value < (0 if zero else 1e-12):
                raise ValueError(f"{name} must be a {'non-negative' if zero else 'positive'} "
                                 f"{'int' if integer else 'number'}, got {value!r}")

        for name in ("max_batch", "queue", "max_items", "reason_queue", "max_new_tokens"):
            positive(name, getattr(self, name))
        positive("port", self.port, zero=True)
        positive("max_wait_ms", self.max_wait_ms, integer=False, zero=True)
        positive("max_body_mb", self.max_body_mb, integer=False)
        positive("drain_s", self.drain_s, integer=False, zero=True)
        if self.threads is not None:
            positive("threads", self.threads)
        if self.port > 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.queue < self.max_batch:
            raise ValueError(f"queue ({self.queue}) must be >= max_batch ({self.max_batch})")
        if self.max_items > self.queue:
            raise ValueError(f"max_items ({self.max_items}) must be <= queue ({self.queue}): a larger request "
                             "could never be queued")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


class HttpError(SdkError):
    """A request-level error: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "bad_request", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers or {}


# ----------------------------------------------------------------------------------- state


class _Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:
            raise _need_serve_extra(exc) from exc
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moon3_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.items = Counter("moon3_items", "Items (products, texts) by endpoint and outcome (ok, bad)",
                             ["endpoint", "outcome"], registry=r)
        self.errors = Counter("moon3_errors", "Errors by kind: bad_item, bad_request, too_large, queue_full, "
                              "engine, not_ready, draining, no_reasoner, internal", ["kind"], registry=r)
        self.latency = Histogram("moon3_request_latency_seconds", "Request latency, body read to response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("moon3_batch_size", "Items per engine batch", buckets=BATCH_BUCKETS, registry=r)
        self.engine = Histogram("moon3_batch_seconds", "Engine time per batch (decode, tokenize, run)",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("moon3_queue_wait_seconds", "Time an item waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("moon3_queue_depth", "Items waiting for the engine", registry=r)
        self.inflight = Gauge("moon3_requests_in_flight", "Requests being handled", registry=r)
        self.ready = Gauge("moon3_ready", "1 when /ready answers 200", registry=r)

    def observe(self, event: str, value: Any) -> None:
        """The batcher's callback."""
        if event == "batch":
            self.batch.observe(value)
        elif event == "engine_s":
            self.engine.observe(value)
        elif event == "queue_wait_s":
            self.queue_wait.observe(value)
        elif event == "engine_error":
            self.errors.labels("engine").inc()


@dataclass
class _State:
    config: ServeConfig
    embedder: Any
    reasoner: Any
    metrics: _Metrics
    model: str
    batcher: DynamicBatcher | None = None
    warmed: bool = False
    draining: bool = False
    warmup_error: str | None = None
    last_engine_error: str | None = None
    reason_pending: int = 0
    inflight: int = 0  # requests being handled (read by the in-flight gauge at scrape time)
    reason_pool: Any = None
    tasks: list = field(default_factory=list)

    def readiness(self) -> tuple[bool, str]:
        b = self.batcher
        if self.draining:
            return False, "draining: the server is shutting down"
        if b is None:
            return False, "starting"
        if not b.alive:
            return False, "the batch worker is not running"
        if self.warmup_error:
            return False, f"warm-up failed: {self.warmup_error}"
        if not self.warmed:
            return False, "warming up"
        if b.engine_failures_in_row >= ENGINE_FAILURES_NOT_READY:
            return False, (f"the engine failed on the last {b.engine_failures_in_row} batches: "
                           f"{self.last_engine_error}")
        return True, "ready"


# ----------------------------------------------------------------------------------- parsing


def _decode_image(value: Any, where: str) -> bytes:
    """A photo sent as base64 (optionally a data: URL) -> its encoded bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}: must be a base64 string of the encoded photo, got {_kind(value)}")
    s = value.strip()
    if "://" in s[:12] or s[:5].lower() == "file:":
        raise InvalidInputError(f"{where}: looks like a URL ({s[:40]!r}); the server never fetches URLs or "
                                "opens paths: send the photo's bytes (base64 in JSON, or a multipart file)")
    if s[:5].lower() == "data:":
        head, comma, s = s.partition(",")
        if not comma or ";base64" not in head.lower():
            raise InvalidInputError(f"{where}: a data URL must be base64 (data:image/jpeg;base64,...), got {head[:40]!r}")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        try:  # MIME-style line breaks
            data = base64.b64decode("".join(s.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInputError(f"{where}: not valid base64 ({exc})") from None
    if not data:
        raise InvalidInputError(f"{where}: empty; expected an encoded photo (JPEG/PNG/WebP) in base64")
    return data


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}: must be a string or null, got {_kind(value)}")
    return value


def _dims(value: Any, state: _State) -> int | None:
    if value is None:
        return None
    emb = state.embedder
    try:
        return check_dim(value, emb.dim, hint=f"the trained widths are {list(emb.matryoshka_dims)}")
    except InvalidInputError as exc:
        raise HttpError(400, str(exc).replace("dim ", "dimensions ", 1), param="dimensions") from None


def _encoding(value: Any) -> str:
    if value is None:
        return "float"
    if value not in ENCODINGS:
        raise HttpError(400, f"encoding_format must be one of {list(ENCODINGS)}, got {value!r}",
                        param="encoding_format")
    return value


def _vector_out(vec: np.ndarray, dim: int | None, encoding: str) -> Any:
    v = vec if dim is None or dim == len(vec) else l2_normalize(vec[None], dim)[0]  # Matryoshka prefix
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode("ascii")
    return v.tolist()


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes (413) before reading it all."""
    size = request.headers.get("content-length")
    if size is not None:
        try:
            declared = int(size)
        except ValueError:
            raise HttpError(400, f"content-length is not a number: {size!r}") from None
        if declared > limit:
            raise HttpError(413, f"the request body is {declared} bytes; the limit is {limit} (--max-body-mb)",
                            kind="too_large")
    chunks, got = [], 0
    async for chunk in request.stream():
        got += len(chunk)
        if got > limit:
            raise HttpError(413, f"the request body is over the limit of {limit} bytes (--max-body-mb)",
                            kind="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_request(request: Any, state: _State) -> tuple[dict, dict[str, bytes] | None]:
    """A JSON object body, or a multipart form -> (fields, files). Multipart field values are
    strings (a field named `items` is parsed as JSON); files are bytes by part name, None for a
    JSON body."""
    body = await _read_body(request, state.config.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body
            yield b""

        n = state.config.max_items
        try:
            form = await MultiPartParser(request.headers, stream(), max_files=n, max_fields=n + len(EMBED_FIELDS) + 8,
                                         max_part_size=state.config.max_body_bytes).parse()
        except MultiPartException as exc:
            raise HttpError(400, f"bad multipart body: {exc.message}") from None
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            else:
                files[key] = await value.read()
                await value.close()
        await form.close()
        if isinstance(fields.get("items"), str):
            try:
                fields["items"] = loads(fields["items"])
            except json.JSONDecodeError as exc:
                raise HttpError(400, f"the multipart field 'items' is not valid JSON: {exc}", param="items") from None
        for key in ("dimensions", "max_new_tokens"):
            if key in fields:
                try:
                    fields[key] = int(fields[key])
                except ValueError:
                    raise HttpError(400, f"{key} must be an int, got {fields[key]!r}", param=key) from None
        return fields, files
    if ctype not in ("application/json", ""):
        raise HttpError(415, f"content-type {ctype!r} is not supported; send application/json or multipart/form-data")
    try:
        data = loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HttpError(400, f"the body must be a JSON object, got {_kind(data)}")
    return data, None


def _unknown(fields: dict, known: Sequence[str], what: str) -> None:
    extra = sorted(set(fields) - set(known))
    if extra:
        raise HttpError(400, f"unknown field(s) {extra} in {what}; known: {list(known)}", param=extra[0])


def _parse_products(fields: dict, files: dict[str, bytes] | None, state: _State) -> tuple[list, dict[int, str], list]:
    """/v1/embed items -> (BatchItem or None per item, {index: error}, ids)."""
    if "items" in fields:
        raw = fields["items"]
        if not isinstance(raw, list):
            raise HttpError(400, f"items must be an array of objects, got {_kind(raw)}", param="items")
    elif files is not None:  # multipart shorthand: one product from the fields id, title, trace and the file image
        raw = [{k: fields[k] for k in ("id", "title", "trace") if k in fields}
               | ({"image_file": "image"} if "image" in files else {})]
    else:
        raise HttpError(400, "the request has no 'items' (an array of {id, title, image, trace} objects)",
                        param="items")
    if not raw:
        raise HttpError(400, "items is empty; send at least one product", param="items")
    _check_count(len(raw), state)
    items: list[BatchItem | None] = []
    errors: dict[int, str] = {}
    ids: list[Any] = []
    for i, it in enumerate(raw):
        ids.append(it.get("id") if isinstance(it, dict) else None)
        try:
            if not isinstance(it, dict):
                raise InvalidInputError(f"item {i}: must be an object with 'title' and/or 'image', got {_kind(it)}")
            extra = sorted(set(it) - set(ITEM_FIELDS))
            if extra:
                raise InvalidInputError(f"item {i}: unknown field(s) {extra}; known: {list(ITEM_FIELDS)}")
            rid = it.get("id")
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
                ids[i] = None
                raise InvalidInputError(f"item {i} id: must be a string or an integer, got {_kind(rid)}")
            image = None
            if it.get("image") is not None and it.get("image_file") is not None:
                raise InvalidInputError(f"item {i}: give 'image' (base64) or 'image_file' (a multipart part), not both")
            if it.get("image") is not None:
                image = _decode_image(it["image"], f"item {i} image")
            elif it.get("image_file") is not None:
                name = it["image_file"]
                if files is None:
                    raise InvalidInputError(f"item {i} image_file: only a multipart request has file parts; "
                                            "in JSON send the photo as base64 in 'image'")
                if not isinstance(name, str) or name not in files:
                    raise InvalidInputError(f"item {i} image_file: no multipart file part named {name!r} "
                                            f"(parts: {sorted(files)[:10]})")
                image = files[name]
                if not image:
                    raise InvalidInputError(f"item {i} image_file: the part {name!r} is empty")
            title = _text(it.get("title"), f"item {i} title")
            trace = _text(it.get("trace"), f"item {i} trace")
            if image is None and not (title and title.strip()) and not (trace and trace.strip()):
                raise InvalidInputError(f"item {i}: nothing to embed (no image, "
                                        f"{'title is empty' if title is not None else 'no title'}); "
                                        "give a photo and/or a title")
            items.append(BatchItem(image, title, trace, count_tokens=False))  # /v1/embed reports no usage
        except InvalidInputError as exc:
            errors[i] = str(exc)
            items.append(None)
    return items, errors, ids


def _parse_openai_input(value: Any, state: _State) -> tuple[list, dict[int, str]]:
    """OpenAI `input`: a string or an array of strings (token-id arrays are refused per item)."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise HttpError(400, f"input must be a string or an array of strings, got {_kind(value)}", param="input")
    elif value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise HttpError(400, "input is an array of token ids; this server embeds text: send the string(s)",
                        param="input")
    if not value:
        raise HttpError(400, "input is empty; send at least one string", param="input")
    _check_count(len(value), state)
    items: list[BatchItem | None] = []
    errors: dict[int, str] = {}
    for i, v in enumerate(value):
        if isinstance(v, list):
            errors[i] = f"item {i}: token-id input is not supported by this server; send the text"
        elif not isinstance(v, str):
            errors[i] = f"item {i}: must be a string, got {_kind(v)}"
        elif not v.strip():
            errors[i] = f"item {i}: the text is empty{' (whitespace only)' if v else ''}"
        else:
            items.append(BatchItem(text=v))
            continue
        items.append(None)
    return items, errors


def _check_count(n: int, state: _State) -> None:
    if n > state.config.max_items:
        raise HttpError(413, f"the request has {n} items; the limit is {state.config.max_items} per request "
                             "(--max-items): split it", kind="too_large")


async def _embed_items(items: list, errors: dict[int, str], state: _State) -> list[ItemResult]:
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
        from starlette.responses import Response
        from starlette.routing import Route
    except ImportError as exc:
        raise _need_serve_extra(exc) from exc

    metrics = _Metrics()
    state = _State(config, embedder, reasoner, metrics, config.model_name or Path(str(config.engine)).stem)
    # read when /metrics is scraped, not kept up to date on every request
    metrics.inflight.set_function(lambda: state.inflight)
    metrics.queue.set_function(lambda: state.batcher.depth if state.batcher is not None else 0)

    def json_response(payload: Any, status: int = 200, headers: dict | None = None) -> Response:
        return Response(dumps(payload), status,
                        headers=headers, media_type="application/json")

    def endpoint(name: str):
        """Common handling: metrics, HTTP errors as OpenAI-style error bodies, no crash on a bug."""

        latency = metrics.latency.labels(name)  # labelled children looked up once, not per request
        requests: dict[int, Any] = {}

        def wrap(fn):
            async def handler(request):
                t0 = time.perf_counter()
                state.inflight += 1
                try:
                    resp = await fn(request)
                except HttpError as exc:
                    metrics.errors.labels(exc.kind).inc()
                    resp = json_response({"error": {"message": str(exc), "type": _ERROR_TYPES.get(exc.status, "error"),
                                                    "param": exc.param, "code": exc.status}}, exc.status, exc.headers)
                except Exception as exc:  # noqa: BLE001 - a bug answers 500 and the server goes on
                    log.exception("internal error on %s", name)
                    metrics.errors.labels("internal").inc()
                    resp = json_response({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
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

        return wrap

    item_counters: dict[tuple[str, str], Any] = {}  # labelled children, made on first use

    def count_items(name: str, results: list[ItemResult]) -> None:
        bad = sum(r.error is not None for r in results)
        for outcome, n in (("bad", bad), ("ok", len(results) - bad)):
            if n:
                counter = item_counters.get((name, outcome))
                if counter is None:
                    counter = item_counters[name, outcome] = metrics.items.labels(name, outcome)
                counter.inc(n)
        if bad:
            metrics.errors.labels("bad_item").inc(bad)

    @endpoint("/v1/embeddings")
    async def openai_embeddings(request):
        fields, _ = await _read_request(request, state)
        if "input" not in fields:
            raise HttpError(400, "missing field 'input' (a string or an array of strings)", param="input")
        dim, enc = _dims(fields.get("dimensions"), state), _encoding(fields.get("encoding_format"))
        items, errors = _parse_openai_input(fields["input"], state)
        results = await _embed_items(items, errors, state)
        count_items("/v1/embeddings", results)
        data = [{"object": "embedding", "index": i, "embedding": _vector_out(r.vector, dim, enc)}
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
        return json_response(payload, status)

    @endpoint("/v1/embed")
    async def embed(request):
        fields, files = await _read_request(request, state)
        _unknown(fields, EMBED_FIELDS if files is None else (*EMBED_FIELDS, "id", "title", "trace"), "the request")
        dim, enc = _dims(fields.get("dimensions"), state), _encoding(fields.get("encoding_format"))
        items, errors, ids = _parse_products(fields, files, state)
        results = await _embed_items(items, errors, state)
        count_items("/v1/embed", results)
        data = []
        for i, r in enumerate(results):
            if r.error is None:
                row = {"index": i, "id": ids[i], "embedding": _vector_out(r.vector, dim, enc)}
                if r.truncated:
                    row["truncated"] = list(r.truncated)
                data.append(row)
        payload = {"object": "list", "model": state.model, "dimensions": dim or state.embedder.dim, "data": data}
        status = _status(results)
        if status != 200:
            payload["errors"] = [{"index": i, "id": ids[i], "message": r.error}
                                 for i, r in enumerate(results) if r.error]
        return json_response(payload, status)

    @endpoint("/v1/reason")
    async def reason(request):
        r = state.reasoner
        if r is None:
            raise HttpError(404, f"{state.model}: this server has no reasoner (the engine has none, or the server "
                                 "was started with --no-reasoner)", kind="no_reasoner")
        fields, files = await _read_request(request, state)
        files = files or {}
        _unknown(fields, REASON_FIELDS, "the request")
        task = fields.get("task", "caption")
        if not isinstance(task, str) or task not in r.tasks:
            raise HttpError(400, f"task must be one of {sorted(r.tasks)}, got {task!r}", param="task")
        try:
            title = _text(fields.get("title"), "title")
        except InvalidInputError as exc:
            raise HttpError(400, str(exc), param="title") from None
        try:
            image = files.get("image") if "image" in files else (
                _decode_image(fields["image"], "image") if fields.get("image") is not None else None)
        except InvalidInputError as exc:
            raise HttpError(400, str(exc), param="image") from None
        budget = fields.get("max_new_tokens", 96)
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= config.max_new_tokens:
            raise HttpError(400, f"max_new_tokens must be an int in [1, {config.max_new_tokens}], got {budget!r}",
                            param="max_new_tokens")
        extra = {k: fields[k] for k in ("key", "question") if fields.get(k) is not None}
        for k, v in extra.items():
            if not isinstance(v, str):
                raise HttpError(400, f"{k} must be a string, got {_kind(v)}", param=k)
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
        return json_response({"object": "reasoning", "model": state.model, "task": task, "text": text,
                              "tokens": n, "seconds": round(dt, 4)})

    async def health(request):
        return json_response({"status": "ok"})

    async def ready(request):
        ok, why = state.readiness()
        metrics.ready.set(1 if ok else 0)
        b = state.batcher
        return json_response({"ready": ok, "status": why, "model": state.model,
                              "precision": state.embedder.precision, "backend": state.embedder.backend,
                              "batch_invariant": state.embedder.batch_invariant, "dim": state.embedder.dim,
                              "queue": b.depth if b else 0,
                              "reasoner": state.reasoner is not None}, 200 if ok else 503)

    async def metrics_endpoint(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        ok, _ = state.readiness()
        metrics.ready.set(1 if ok else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(request):
        emb = state.embedder
        return json_response({"object": "list", "data": [
            {"id": state.model, "object": "model", "owned_by": "moon3-sdk", "created": 0, "dim": emb.dim,
             "matryoshka_dims": list(emb.matryoshka_dims), "precision": emb.precision}]})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        from concurrent.futures import ThreadPoolExecutor

        def observe(event: str, value: Any) -> None:
            if event == "engine_error":
                state.last_engine_error = str(value)[:500]
            metrics.observe(event, value)

        state.batcher = DynamicBatcher(embedder, config.max_batch, config.max_wait_ms / 1000, config.queue, observe)
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
            embedder.close()

    routes = [
        Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
        Route("/v1/embed", embed, methods=["POST"]),
        Route("/v1/reason", reason, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    from starlette.requests import Request

    hot = {"/v1/embeddings": openai_embeddings, "/v1/embed": embed}

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

    app = App(routes=routes, lifespan=lifespan)
    app.state.moon3 = state
    return app


_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "server_error"}


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


async def _warm_up(state: _State) -> None:
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


# ----------------------------------------------------------------------------------- running


def load(config: ServeConfig) -> tuple[Any, Any]:
    """Load the engine's embedder (and reasoner, if it has one and `config.reasoner`).

    Raises:
        EngineError: the file is missing, damaged or unusable (the message says which part).
    """
    from sdk.embedder import Embedder
    from sdk.engine import EngineFile

    with EngineFile.open(config.engine) as engine:
        threads = config.threads if config.threads is not None else default_threads()
        embedder = Embedder(engine, providers=config.providers, threads=threads)
        reasoner = None
        if config.reasoner and isinstance(engine.manifest.get("reasoner"), dict):
            from sdk.reasoner import Reasoner

            reasoner = Reasoner(engine, threads=threads, providers=config.providers)
    return embedder, reasoner


def serve(config: ServeConfig, embedder: Any = None, reasoner: Any = None) -> int:
    """Load the engine and serve it until SIGTERM / SIGINT (then drain); returns the exit code.

    Raises:
        EngineError: the engine file is missing or damaged (before anything listens).
        BackendUnavailableError: the [serve] extra is not installed.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise _need_serve_extra(exc) from exc
    # A batch's titles are tokenized on the engine thread; the tokenizers library would fan each
    # call out to a thread per core, which spin on the cores the engine and the event loop need.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if embedder is None:
        embedder, reasoner = load(config)
    app = create_app(config, embedder, reasoner)
    state: _State = app.state.moon3

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: /ready says 503 at once, then uvicorn drains
            state.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises a caught SIGTERM after its shutdown, so the process would die of the
            # signal (status 143); a completed drain exits 0 instead.
            import signal
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            for s in self.servers:
                for sock in s.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"moon3 serve: {state.model} ({embedder.precision}, {embedder.backend}) listening on "
                          f"http://{host}:{port}", flush=True)

    ucfg = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          access_log=config.access_log, timeout_graceful_shutdown=config.drain_s or None,
                          lifespan="on", ws="none", server_header=False)
    server = Server(ucfg)
    server.run()
    return 0 if server.started else 1


def main_args(args: Any) -> int:
    """`moon3 serve` (sdk.cli) -> `serve`."""
    cfg = ServeConfig(engine=args.engine, host=args.host, port=args.port, max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms, queue=args.queue, max_items=args.max_items,
                      max_body_mb=args.max_body_mb, reason_queue=args.reason_queue, drain_s=args.drain_s,
                      threads=args.threads, providers=args.providers, reasoner=not args.no_reasoner,
                      model_name=args.model_name, log_level=args.log_level, access_log=args.access_log)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise _need_serve_extra(exc) from exc
    print(f"moon3 serve: loading {cfg.engine}", file=sys.stderr, flush=True)
    return serve(cfg)
