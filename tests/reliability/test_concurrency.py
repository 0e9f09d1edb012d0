"""One shared Embedder under concurrent use: mixed workloads from 8 threads give exactly the
single-thread vectors and error reports, a bounded stress run never deadlocks, and closing the
embedder while others embed is an SdkError, never a crash or a hang."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from sdk.errors import SdkError

pytest.importorskip("onnxruntime")

N_THREADS = 8
STRESS_S = 3.0
JOIN_S = 60.0  # a thread still running this long after the stress window is a deadlock


def picture(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(-1, 1, (3, 3))
    img = np.stack([a[k] * x + b[k] * y + c[k] for k in range(3)], -1)
    return ((img - img.min()) / (np.ptp(img) + 1e-9) * 255).astype(np.uint8)


def png(arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


WORDS = "red blue black white shoe shirt running cotton men women sport casual leather bag watch dress".split()


def workloads() -> list[dict]:
    """Twelve different calls: sizes, modalities, widths, batch sizes, bad items, truncation."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(12):
        n = int(rng.integers(1, 14))
        images = [None if rng.random() < 0.3 else
                  (picture(k * 100 + i, int(rng.integers(8, 200)), int(rng.integers(8, 200))) if i % 2
                   else png(picture(k * 100 + i, 40, 30))) for i in range(n)]
        texts = [None if rng.random() < 0.2 else " ".join(rng.choice(WORDS, int(rng.integers(1, 20))))
                 for _ in range(n)]
        if k % 3 == 0:
            images[0], texts[0] = b"not an image", "red"  # a bad item in some calls
        if all(i is None for i in images) and all(t is None for t in texts):
            texts[0] = "red"
        out.append({"images": images, "texts": texts, "dim": [None, 16, 8][k % 3], "batch_size": int(rng.integers(1, 9))})
    return out


def call(emb, w):
    """embed_batch (never raises for an item, never warns) -> (vectors, errors, truncated)."""
    r = emb.embed_batch(**w)
    return r.vectors, r.errors, r.truncated


def same(a, b) -> bool:
    return a[1] == b[1] and a[2] == b[2] and np.array_equal(a[0], b[0], equal_nan=True)


LAYOUTS = ["single", "split"]  # one ONNX graph; image + text graphs with the NumPy/_C head


def engine_path(request, layout):
    return request.getfixturevalue("tiny_engine" if layout == "single" else "tiny_split_engine").path


@pytest.fixture(scope="module", params=LAYOUTS)
def emb(request):
    from sdk import Embedder

    with Embedder(engine_path(request, request.param), threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def reference(emb):
    ws = workloads()
    want = [call(emb, w) for w in ws]
    assert sum(bool(r[1]) for r in want) >= 3 and sum(bool(r[2]) for r in want) >= 2  # bad and cut items
    return ws, want


def run_threads(target, n=N_THREADS, join_s=JOIN_S):
    """Start n threads at a barrier; fail (not hang) if any is still running after join_s."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def wrapped(k):
        try:
            start.wait()
            target(k)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + join_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {join_s}s (deadlock?): {alive}"
    if errors:
        raise errors[0]


def test_eight_threads_get_the_single_thread_results(emb, reference):
    """Each thread runs every workload in its own order, all at once: same vectors, bit for bit,
    and the same per-item errors and truncation reports."""
    ws, want = reference
    got: dict[int, list] = {}

    def work(k):
        order = np.random.default_rng(k).permutation(len(ws))
        got[k] = [(i, call(emb, ws[i])) for i in order]

    run_threads(work)
    assert len(got) == N_THREADS
    for results in got.values():
        for i, r in results:
            assert same(r, want[i]), f"workload {i} differs under concurrency"


def test_bounded_stress_run_has_no_deadlock(emb, reference):
    """Threads loop over random workloads (embed, embed_batch, bad items, raise mode) for a few
    seconds; every result is checked; the guard fails the test instead of hanging."""
    from sdk.errors import BatchError, InvalidInputError

    ws, want = reference
    stop = time.monotonic() + STRESS_S
    counts = [0] * N_THREADS

    def work(k):
        rng = np.random.default_rng(100 + k)
        while time.monotonic() < stop:
            i = int(rng.integers(len(ws)))
            vectors, errors, truncated = want[i]
            mode = int(rng.integers(3)) if not truncated else 0  # (embed would warn: not thread-safe to catch)
            if mode == 0:
                assert same(call(emb, ws[i]), want[i])
            elif not errors:
                np.testing.assert_array_equal(emb.embed(**ws[i], errors=("report", "raise")[mode - 1]), vectors)
            elif mode == 1:
                with pytest.raises(BatchError) as info:
                    emb.embed(**ws[i])
                assert info.value.errors == errors
                np.testing.assert_array_equal(info.value.vectors, vectors)
            else:
                with pytest.raises(InvalidInputError) as info:
                    emb.embed(**ws[i], errors="raise")
                assert str(info.value) == errors[min(errors)]
            counts[k] += 1

    run_threads(work, join_s=STRESS_S + JOIN_S)
    assert min(counts) >= 1, counts


def test_close_while_others_embed(emb, reference):
    """Closing the shared embedder mid-flight: calls already running finish with correct
    vectors, later ones raise SdkError ("is closed"); nothing crashes or hangs."""
    from sdk import Embedder

    ws, want = reference
    e = Embedder(emb.path, threads=1)
    outcomes: list[str] = []
    lock = threading.Lock()

    def work(k):
        if k == 0:  # close once some calls are done, while the others are still looping
            give_up = time.monotonic() + 30
            while outcomes.count("ok") < 3 and time.monotonic() < give_up:
                time.sleep(0.001)
            e.close()
            return
        for j in range(40):
            i = (k + j) % len(ws)
            try:
                r = call(e, ws[i])
            except SdkError as exc:
                assert "is closed" in str(exc)
                with lock:
                    outcomes.append("closed")
                return
            assert same(r, want[i])
            with lock:
                outcomes.append("ok")

    run_threads(work)
    assert "closed" in outcomes and "ok" in outcomes
    with pytest.raises(SdkError, match="is closed"):
        e.embed(texts=["red"])
