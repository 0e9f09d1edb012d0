"""The embedder runtime: a `moon3.engine` -> L2-normalised product vectors, on ONNX Runtime.

    from sdk import Embedder
    with Embedder("moon3.engine") as emb:                       # providers=["cpu"] by default
        v = emb.embed(images=["shoe.jpg", None], texts=["red running shoe", "blue t-shirt"])  # (2, 256)
        v64 = emb.embed(texts=["red running shoe"], dim=64)     # a Matryoshka prefix, renormalised

Item i uses images[i], texts[i] and traces[i] where not None, exactly as the PyTorch teacher
(`sdk.train.reference.ReferenceEmbedder`) does: an absent image is zero pixels with
present[image]=0; an absent (None, empty or whitespace) text or trace is the tokenized "" with
its presence 0.

Bad items never cost the good ones. Problems are reported per item index:
  * `embed(..., errors="report")` (default) embeds every good item, then, if any item was bad,
    raises `BatchError` carrying `.vectors` (N, dim) with NaN rows for the bad items and
    `.errors` {index: message}. With no bad item it returns the plain (N, dim) array.
  * `embed(..., errors="raise")` raises `InvalidInputError` at the first bad item met, naming its
    index (type and emptiness checks run over all items first, in index order; images are
    decoded batch by batch).
  * `embed_batch(...)` never raises for a bad item: it returns `Embeddings(vectors, errors,
    truncated)`, for pipelines that log and skip.
Text or traces longer than the engine's token budget (manifest["preprocess"]["text"/"trace"]
["max_length"]) are truncated, as in training: `embed` reports it with one `TruncationWarning`
per call, `embed_batch` in `Embeddings.truncated`.

Throughput: items are tokenized once, sorted by token length (trace, then title), cut into
batches of `batch_size` and padded only to the longest item of their batch; the order is
restored on output. `embed` keeps no per-call state on the instance, so one `Embedder` (one
ONNX Runtime session) can serve many threads.

This module never imports torch; onnxruntime is imported when an `Embedder` is created.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sdk.contract import EmbedderSpec, fingerprint, read_embedder_spec
from sdk.engine import EngineFile
from sdk.errors import (
    BatchError,
    EngineError,
    InvalidInputError,
    SdkError,
    TruncationWarning,
)
from sdk.inputs import EngineTokenizer, Items, Tokenized, collect_items, feed, record_columns, text_column, tokenize
from sdk.ops import check_dim, l2_normalize
from sdk.preprocess import image_to_array, load_image
from sdk.runners import Runner, open_runner
from sdk.sessions import (  # BACKENDS, Backend and available_backends: also public here
    BACKENDS,
    ActiveBackend,
    Backend,
    EngineSessions,
    available_backends,
)

__all__ = ["BACKENDS", "Backend", "Embedder", "Embeddings", "available_backends"]

ERRORS = ("report", "raise")
COMPLETE = (None, "image")  # what `embed(..., complete_missing=)` accepts
# Each thread that embeds photos keeps one pixel buffer for batches up to this many items (19 MB
# at 224 px), so a batch's photos are decoded straight into memory that is already mapped; a
# larger batch, or one without photos, gets a fresh array.
PIXEL_BUFFER_ROWS = 32


@dataclass(frozen=True)
class Embeddings:
    """What `Embedder.embed_batch` returns.

    Attributes:
        vectors: (N, dim) float32, L2-normalised; the rows of bad items are NaN.
        errors: item index -> what was wrong with it (only the bad items).
        truncated: item index -> the modalities ("text", "trace") cut to the token budget.
    """

    vectors: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    truncated: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> np.ndarray:
        """(N,) bool mask of the items that were embedded."""
        ok = np.ones(len(self.vectors), dtype=bool)
        ok[list(self.errors)] = False
        return ok

    def __len__(self) -> int:
        return len(self.vectors)


class Embedder(ActiveBackend):
    """Embeds products (image, title, reasoning trace) with a `moon3.engine`.

    Args:
        path: the engine file (or an open `sdk.engine.EngineFile`). Its header and manifest are
            verified at once; each part the embedder uses (graphs, head, tokenizers) is verified
            against its checksum when read, before it runs. Parts it does not use (a reasoner's
            graphs, TensorRT plans) are never read.
        providers: backend names from `BACKENDS`, in order of preference ("cpu", "cuda",
            "tensorrt"), or one name; None means ["cpu"].
        threads: ONNX Runtime intra-op threads; None lets ONNX Runtime choose.

    Raises:
        EngineError: the file is missing, damaged, of another format version, has no embedder
            or an embedder this runtime cannot feed, or ONNX Runtime cannot load its graph.
        ValueError: an unknown backend name (the message lists the known ones) or bad `threads`.
        BackendUnavailableError: a requested backend is not in this onnxruntime build (the
            message names the pip extra that brings it).

    Warns:
        RuntimeWarning: a requested backend was accepted but ONNX Runtime did not activate it
            (e.g. CUDA libraries missing); `backend` then tells what really runs.
    """

    def __init__(
        self,
        path: str | os.PathLike | EngineFile,
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
    ):
        self._load(path, providers, threads)  # reads only the embedder's parts (never a reasoner's graphs)

    def _init(self, engine: EngineFile, names: list[str], threads: int | None, ort) -> None:
        self._path = engine.path
        self._manifest = engine.manifest
        self._buffers = threading.local()
        self._spec: EmbedderSpec = read_embedder_spec(engine.manifest, engine.path)
        self._text_tok, self._trace_tok = _tokenizers(engine, self._spec)
        load = EngineSessions(engine, names, threads, ort).open
        self._runner: Runner | None
        self._runner, session = open_runner(engine, self._spec, load)
        self._fingerprint = fingerprint(engine.manifest, self._spec)  # every part it names was read above
        self._activate(session.get_providers(), names, "embedding")
        _warn_tensorrt_plans(self._path, self._manifest, self.backend)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Full embedding width."""
        return self._spec.dim

    @property
    def fingerprint(self) -> str:
        """Identity of what this embedder computes: a hash of the checksums of the parts it runs
        (graphs, head, tokenizers), its preprocessing and its output. Two engines with the same
        fingerprint give the same vectors; a vector index records it (see `sdk.index`)."""
        return self._fingerprint

    @property
    def matryoshka_dims(self) -> tuple[int, ...]:
        """The prefix widths the model was trained for (increasing, ending at `dim`)."""
        return self._spec.matryoshka_dims

    @property
    def manifest(self) -> dict:
        """A copy of the engine manifest."""
        return copy.deepcopy(self._manifest)

    @property
    def precision(self) -> str:
        """Precision label of the embedder graph (e.g. "fp32", "int8-dynamic")."""
        return self._spec.precision

    @property
    def batch_invariant(self) -> bool:
        """Whether an item's vector is the same alone or in any batch (to float rounding).

        False only for "int8-dynamic" engines, whose activation scale is one per batch; build with
        `moon3 build --int8-activations per-token` for an INT8 engine that is batch-invariant.
        """
        return self._spec.precision != "int8-dynamic"

    @property
    def completes(self) -> tuple[str, ...]:
        """The missing modalities this engine can complete (`embed(..., complete_missing=...)`)."""
        runner = self._runner
        return ("image",) if runner is not None and runner.completion_session is not None else ()

    def count_tokens(self, texts: Sequence[str], field: str = "text") -> list[int]:
        """Tokens of each text as this engine's tokenizer cuts it for `field` ("text" for titles,
        "trace" for reasoning traces): at most that field's token budget.

        Raises:
            ValueError: `field` is neither "text" nor "trace".
            InvalidInputError: `texts` is not a sequence of str (a single str included), naming the item.
        """
        if field not in ("text", "trace"):
            raise ValueError(f"field must be 'text' or 'trace', got {field!r}")
        tok = self._text_tok if field == "text" else self._trace_tok
        return [len(ids) for ids, _ in tok.encode(text_column(texts, "texts"))]

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return (f"Embedder({str(self._path)!r}, dim={self.dim}, precision={self.precision!r}, "
                f"backend={self.backend!r})")

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release the ONNX Runtime sessions and the pixel buffers; later calls raise `SdkError`."""
        self._runner = None
        self._buffers = threading.local()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ embedding

    def embed(
        self,
        images: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
        traces: Sequence[str | None] | None = None,
        *,
        dim: int | None = None,
        batch_size: int = 32,
        errors: str = "report",
        complete_missing: str | None = None,
    ) -> np.ndarray:
        """Embed items; item i uses images[i], texts[i] and traces[i] where not None.

        Args:
            images: per item a path, encoded bytes, a PIL image, an HWC uint8 array, or None;
                an (N, H, W, C) uint8 array also works.
            texts: per item the title (str) or None; empty or whitespace text counts as absent.
            traces: per item a reasoning trace (str) or None, as texts.
            dim: output width, any int in [1, dim]; the trained Matryoshka prefixes are
                `matryoshka_dims`, other widths are plain truncations. None = full width.
            batch_size: items per ONNX Runtime call.
            errors: "report" embeds every good item and then raises `BatchError` (carrying the
                vectors and every bad index) if any item was bad; "raise" raises at the first
                bad item met.
            complete_missing: None (default) embeds each item with the modalities it has;
                "image" gives an item with a title but no photo image tokens completed from its
                title (the engine's completion part, see `completes`), fused as title + image.

        Returns:
            (N, dim) float32, L2-normalised rows, in input order.

        Raises:
            BatchError: errors="report" and some items were bad; `.vectors` holds all N rows
                (NaN for bad items), `.errors` {index: message}.
            InvalidInputError: errors="raise" and an item is bad (the message names its index
                and the problem), or the call itself is malformed (lengths differ, bad dim).
            ValueError: `errors` is not "report" or "raise".
            EngineError: complete_missing="image" and the engine has no completion part.

        Warns:
            TruncationWarning: once per call, when a text or trace was cut to the token budget.
        """
        if errors not in ERRORS:
            raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
        items = collect_items(images, texts, traces)
        result = self._run(items, dim, batch_size, fail_fast=errors == "raise", complete=complete_missing)
        return self._finish(result)

    def embed_batch(
        self,
        images: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
        traces: Sequence[str | None] | None = None,
        *,
        dim: int | None = None,
        batch_size: int = 32,
        complete_missing: str | None = None,
    ) -> Embeddings:
        """Like `embed`, but bad items never raise: they are reported in the result.

        Returns:
            `Embeddings`: `.vectors` (N, dim) float32 (NaN rows for bad items), `.errors`
            {index: message}, `.truncated` {index: ("text", "trace")}, `.ok` mask.

        Raises:
            InvalidInputError: the call itself is malformed (lengths differ, bad dim, batch_size,
                complete_missing).
            EngineError: complete_missing="image" and the engine has no completion part.
        """
        return self._run(collect_items(images, texts, traces), dim, batch_size, fail_fast=False,
                         complete=complete_missing)

    def embed_products(
        self,
        records: Iterable[Mapping[str, Any]],
        root: str | os.PathLike | None = None,
        *,
        dim: int | None = None,
        batch_size: int = 32,
        errors: str = "report",
        complete_missing: str | None = None,
    ) -> np.ndarray:
        """Embed catalog records (the `items.jsonl` format), with `embed`'s error semantics.

        Args:
            records: dicts with "title" (str), optional "image" (a path, relative to `root`
                unless absolute) and optional "trace" (str); other keys are ignored.
            root: folder the image paths are relative to (None: the current directory).
            dim, batch_size, errors, complete_missing: as in `embed`.

        Returns:
            (N, dim) float32, L2-normalised rows, one per record.

        Raises:
            BatchError, InvalidInputError, ValueError: as in `embed`; a record's problems are
                reported as "record i: ...".
        """
        if errors not in ERRORS:
            raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
        images, texts, traces, pre = record_columns(records, root)
        items = collect_items(images, texts, traces, what="record", labels=("image", "title", "trace"), pre=pre)
        return self._finish(self._run(items, dim, batch_size, fail_fast=errors == "raise", what="record",
                                      complete=complete_missing))

    # ------------------------------------------------------------------ internals

    def _finish(self, result: Embeddings) -> np.ndarray:
        if result.truncated:
            idx = sorted(result.truncated)
            warnings.warn(
                f"{len(idx)} of {len(result)} item(s) were truncated to the engine's token budget "
                f"(text {self._text_tok.max_length}, trace {self._trace_tok.max_length} tokens): items "
                f"{idx[:10]}{' ...' if len(idx) > 10 else ''}",
                TruncationWarning,
                stacklevel=3,
            )
        if result.errors:
            bad = sorted(result.errors)
            shown = "; ".join(result.errors[i] for i in bad[:5])
            more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise BatchError(
                f"{len(bad)} of {len(result)} item(s) could not be embedded: {shown}{more}. The other "
                f"{len(result) - len(bad)} vector(s) are in .vectors (bad rows are NaN), every problem in .errors",
                result.vectors,
                dict(result.errors),
            )
        return result.vectors

    def _run(
        self, items: Items, dim: int | None, batch_size: int, *, fail_fast: bool, what: str = "item",
        complete: str | None = None,
    ) -> Embeddings:
        runner = self._runner  # one snapshot for the whole call: a close() from another thread cannot interfere
        if runner is None:
            raise SdkError(f"{self!r} is closed")
        if complete not in COMPLETE:
            raise InvalidInputError(f"complete_missing must be one of {COMPLETE}, got {complete!r}")
        if complete is not None and complete not in self.completes:
            raise EngineError(f"{self._path}: this engine cannot complete a missing {complete} (it completes "
                              f"{list(self.completes) or 'nothing'}); build it with the completion weights "
                              f"(sdk/train/weights/completion) and the split layout")
        dim = self._check_dim(dim)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
        errors = dict(items.errors)
        if fail_fast and errors:
            raise InvalidInputError(errors[min(errors)])
        good = [i for i in range(items.n) if i not in errors]
        tok = tokenize(items, good, self._text_tok, self._trace_tok)
        full = np.full((items.n, self.dim), np.nan, np.float32)  # (N, D)
        for start in range(0, len(tok.order), batch_size):
            self._run_batch(runner, items, tok, tok.order[start : start + batch_size], full, errors,
                            fail_fast=fail_fast, what=what, complete=complete)
        self._check_finite(full, good, errors, fail_fast=fail_fast, what=what)
        keep = np.array([i for i in good if i not in errors], dtype=np.int64)
        if dim < self.dim:
            vectors = np.full((items.n, dim), np.nan, np.float32)  # (N, dim)
            if keep.size:
                vectors[keep] = l2_normalize(full[keep], dim)
        else:
            vectors = full  # the graph's output is already L2-normalised
        truncated = {i: c for i, c in tok.truncated.items() if i not in errors}
        return Embeddings(vectors, dict(sorted(errors.items())), truncated)

    def _run_batch(
        self, runner: Runner, items: Items, tok: Tokenized, todo: list[int], full: np.ndarray,
        errors: dict[int, str], *, fail_fast: bool, what: str, complete: str | None,
    ) -> None:
        """Decode the photos of `todo`, run the runner on the items that decoded and write their
        rows of `full`; a photo that cannot be read is recorded in `errors` (or raised)."""
        size = self._spec.image.size
        photos = any(items.images[i] is not None for i in todo)
        # (>= len(todo), 3, H, W): this thread's buffer; without photos, zeros never touched
        buf = self._pixel_buffer(len(todo)) if photos else np.zeros((len(todo), 3, size, size), np.float32)
        chunk = []
        for i in todo:  # photos decode straight into the buffer's rows
            src, row = items.images[i], buf[len(chunk)]
            if src is None:
                if photos:
                    row[...] = 0.0
            else:
                try:
                    image_to_array(load_image(src, name=f"{what} {i} image"), self._spec.image, out=row)
                except InvalidInputError as exc:
                    if fail_fast:
                        raise
                    errors[i] = str(exc)
                    continue
            chunk.append(i)
        if not chunk:
            return
        batch = feed(items, chunk, tok, buf[: len(chunk)])
        try:
            full[chunk] = runner(batch, complete_image=complete == "image")  # (B, D)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            raise EngineError(f"{self._path}: the embedder graph failed on inputs {shapes}: {exc}") from exc

    @staticmethod
    def _check_finite(full: np.ndarray, good: list[int], errors: dict[int, str], *, fail_fast: bool,
                      what: str) -> None:
        """A NaN/inf vector is the engine's fault for that item: reported (or raised), its row NaN."""
        done = [i for i in good if i not in errors]
        finite = np.isfinite(full[done]).all(axis=1) if done else np.ones(0, bool)
        for i, ok in zip(done, finite):
            if not ok:
                msg = (f"{what} {i}: the engine produced a non-finite vector (NaN/inf); "
                       "the engine may be broken for this input")
                if fail_fast:
                    raise InvalidInputError(msg)
                errors[i] = msg
                full[i] = np.nan

    def _pixel_buffer(self, rows: int) -> np.ndarray:
        """This thread's reusable (>= rows, 3, H, W) float32 pixel buffer (grown on demand up to
        PIXEL_BUFFER_ROWS rows; a larger batch gets a fresh array each time). Freed when the thread
        ends or the embedder is closed."""
        size = self._spec.image.size
        if rows > PIXEL_BUFFER_ROWS:
            return np.empty((rows, 3, size, size), np.float32)
        buf = getattr(self._buffers, "pixels", None)
        if buf is None or buf.shape[0] < rows:
            buf = self._buffers.pixels = np.empty((min(max(rows, 8), PIXEL_BUFFER_ROWS), 3, size, size), np.float32)
        return buf

    def _check_dim(self, dim: Any) -> int:
        return check_dim(dim, self.dim, hint=f"the trained widths are {list(self.matryoshka_dims)}")


def _tokenizers(engine: EngineFile, spec: EmbedderSpec) -> tuple[EngineTokenizer, EngineTokenizer]:
    """The title and trace tokenizers (one object where both use the same part and budget)."""
    toks: dict[tuple[str, int], EngineTokenizer] = {}
    for p, n in ((spec.text_tokenizer, spec.text_max_length), (spec.trace_tokenizer, spec.trace_max_length)):
        if (p, n) in toks:
            continue
        blob = engine.part(p)
        try:
            toks[p, n] = EngineTokenizer(blob.decode("utf-8"), n)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception types
            raise EngineError(f"{engine.path}: tokenizer part {p!r} cannot be loaded: {exc}") from exc
    return toks[spec.text_tokenizer, spec.text_max_length], toks[spec.trace_tokenizer, spec.trace_max_length]


def _warn_tensorrt_plans(path: Path, manifest: Mapping[str, Any], backend: str) -> None:
    """Say that an engine's TensorRT plans are not used by this runtime."""
    trt = manifest.get("tensorrt")
    plans = trt.get("plans") if isinstance(trt, dict) else None
    if plans:
        built = ", ".join(sorted({f"{p.get('gpu_arch', '?')} / TensorRT {p.get('tensorrt', '?')}"
                                  for p in plans if isinstance(p, dict)})) or "unknown GPUs"
        warnings.warn(
            f"{path}: the engine carries TensorRT plan(s) built for {built}; this runtime has no native "
            f"TensorRT backend yet, so the plans are ignored and the ONNX graphs run on {backend!r}",
            RuntimeWarning,
            stacklevel=5,
        )
