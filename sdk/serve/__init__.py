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

Items of concurrent requests are merged into engine batches by `sdk.serve.batch.DynamicBatcher`;
a bad item is reported by index (HTTP 207 when some items of a request were good, 422 when none
was) and never costs the good ones or later requests. A full queue answers 429 with Retry-After.
SIGTERM stops accepting connections, finishes the requests in flight, then exits.

The web stack is Starlette on uvicorn, imported only when a server is created: `import sdk`
and `import sdk.serve` work without the [serve] extra. Never imports torch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from sdk.serve.app import create_app
from sdk.serve.parsing import need_serve_extra
from sdk.serve.state import ServeConfig, default_threads

__all__ = ["ServeConfig", "create_app", "default_threads", "serve"]


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


def serve(config: ServeConfig, embedder: Any = None, reasoner: Any = None, exiting: bool = False) -> int:
    """Load the engine and serve it until SIGTERM / SIGINT (then drain); returns the exit code.

    exiting: the process ends when this returns (`moon3 serve`): a SIGTERM that arrives after the
    drain (a supervisor repeating its stop signal) is ignored, so a completed drain still exits 0
    instead of dying of the signal during teardown.

    Raises:
        EngineError: the engine file is missing or damaged (before anything listens).
        BackendUnavailableError: the [serve] extra is not installed.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise need_serve_extra(exc) from exc
    # A batch's titles are tokenized on the engine thread; the tokenizers library would fan each
    # call out to a thread per core, which spin on the cores the engine and the event loop need.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if embedder is None:
        embedder, reasoner = load(config)
    app = create_app(config, embedder, reasoner)
    state = app.state.moon3  # sdk.serve.state.ServerState

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
            if exiting:
                before[signal.SIGTERM] = signal.SIG_IGN
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
        raise need_serve_extra(exc) from exc
    print(f"moon3 serve: loading {cfg.engine}", file=sys.stderr, flush=True)
    return serve(cfg, exiting=True)
