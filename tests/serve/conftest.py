"""Fixtures of the `moon3 serve` tests: real servers (`python -m sdk serve` subprocesses on
127.0.0.1) around the tiny split engine of tests/conftest.py.

The tiny engine is FP32, so its vectors do not depend on the batch: the server's must equal
`sdk.Embedder`'s to 1e-6 whatever batches the requests were merged into.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
pytest.importorskip("prometheus_client", reason="the [serve] extra is not installed")
pytest.importorskip("httpx", reason="the [serve] extra is not installed")

from serve_helpers import Server  # noqa: E402


@pytest.fixture(scope="session")
def engine_path(tiny_split_engine) -> Path:
    return tiny_split_engine.path


@pytest.fixture(scope="session")
def server(engine_path):
    """One server for the API and batching tests: small batches and limits, so that merging, the
    item limit and the body limit are all reachable with small requests."""
    s = Server(engine_path, "--max-batch", "8", "--max-wait-ms", "20", "--queue", "256", "--max-items", "64",
               "--max-body-mb", "1")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def reference(engine_path):
    """An in-process `sdk.Embedder` on the same engine: the vectors the server must give."""
    from sdk.embedder import Embedder

    emb = Embedder(engine_path, threads=1)
    yield emb
    emb.close()


