"""What a `moon3 serve` process knows: its settings (`ServeConfig`), its Prometheus metrics and the
state its endpoints share (batcher, readiness, drain). Never imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sdk.serve.batch import DynamicBatcher
from sdk.serve.parsing import need_serve_extra

__all__ = ["Metrics", "ServeConfig", "ServerState", "default_threads"]

ENGINE_FAILURES_NOT_READY = 3  # batches in a row failing in the engine before /ready says 503
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def default_threads() -> int:
    """ONNX Runtime intra-op threads when --threads is not given: the physical cores this process
    may use, as an in-process `Embedder` gets. On a machine that serves (the load test, quiet) that
    is the fastest setting; on one shared with other busy jobs, fewer (`--threads`) waste less CPU
    at the pool's barrier (docs/serve.md, Load test)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


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


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:
            raise need_serve_extra(exc) from exc
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
class ServerState:
    config: ServeConfig
    embedder: Any
    reasoner: Any
    metrics: Metrics
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
