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
import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sdk.engine import EngineFile
from sdk.errors import (
    BatchError,
    EngineError,
    InvalidInputError,
    SdkError,
    TruncationWarning,
)
from sdk.ops import check_dim, l2_normalize
from sdk.preprocess import ImagePreprocess, image_to_array, load_image
from sdk.sessions import (  # BACKENDS, Backend and available_backends: also public here
    BACKENDS,
    ActiveBackend,
    Backend,
    EngineSessions,
    available_backends,
)

__all__ = ["BACKENDS", "Backend", "Embedder", "Embeddings", "available_backends"]

# The graph ABI (sdk.export.onnx_embedder.INPUT_NAMES); `present` columns: image, text, trace.
INPUT_NAMES = ("pixels", "input_ids", "attention_mask", "trace_ids", "trace_mask", "present")
_IMAGE, _TEXT, _TRACE = 0, 1, 2
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


class _Tokenizer:
    """`sdk.preprocess.TextTokenizer` built from tokenizer.json text instead of a file.

    Same settings (no padding, truncation to `max_length`); it also tells which items were cut.
    Immutable after construction, so threads may share it.
    """

    def __init__(self, json_text: str, max_length: int):
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._tok = Tokenizer.from_str(json_text)
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)

    def encode(self, texts: list[str]) -> list[tuple[list[int], bool]]:
        """texts -> [(token ids, truncated?)] (truncated: the text did not fit max_length)."""
        return [(e.ids, bool(e.overflowing)) for e in self._tok.encode_batch(texts)]


def _pad(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token ids with 0 to the longest (>= 1), as TextTokenizer does -> (ids, mask) (B, T)."""
    t = max(1, max((len(s) for s in seqs), default=1))
    ids = np.zeros((len(seqs), t), np.int64)  # (B, T)
    mask = np.zeros((len(seqs), t), np.int64)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class _Items:
    """One call's items after the cheap checks (local to the call: nothing is shared)."""

    n: int
    images: list[Any]
    texts: list[str | None]  # None = absent
    traces: list[str | None]
    errors: dict[int, str]


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
        spec = _embedder_spec(engine)
        self._dim: int = spec["dim"]
        self._matryoshka: tuple[int, ...] = spec["matryoshka_dims"]
        self._precision: str = spec["precision"]
        self._output: str = spec["output"]
        self._image_cfg: ImagePreprocess = spec["image"]
        self._text_tok: _Tokenizer = spec["text_tokenizer"]
        self._trace_tok: _Tokenizer = spec["trace_tokenizer"]

        load = EngineSessions(engine, names, threads, ort).open
        self._layout: str = spec["layout"]
        if self._layout == "split":
            from sdk.head import FusionHead, SplitRunner

            parts = spec["parts"]
            image_s, text_s = load(parts["image"]), load(parts["text"])
            head = FusionHead.from_bytes(engine.part(parts["head"]), f"{self._path}: part {parts['head']!r}")
            _check_split_graphs(image_s, text_s, self._path, self._image_cfg.size, head.skip_path)
            if head.out_dim != self._dim:
                raise EngineError(f"{self._path}: the head gives {head.out_dim}-d vectors, "
                                  f"the manifest says dim {self._dim}")
            completion = None
            if self._manifest.get("completion") is not None:
                completion = load(_completion_part(self._manifest["completion"], self._path))
                _check_completion_graph(completion, self._path, head)
            self._split: SplitRunner | None = SplitRunner(image_s, text_s, head, completion)
            session = image_s
        else:
            session = load(spec["parts"]["embedder"])
            _check_graph(session, self._path, self._output, self._dim, self._image_cfg.size)
            self._split = None
        self._session = session
        self._fingerprint = _fingerprint(engine, spec)  # every part it names was read above
        self._activate(session.get_providers(), names, "embedding")
        trt = self._manifest.get("tensorrt")
        plans = trt.get("plans") if isinstance(trt, dict) else None
        if plans:
            built = ", ".join(sorted({f"{p.get('gpu_arch', '?')} / TensorRT {p.get('tensorrt', '?')}"
                                      for p in plans if isinstance(p, dict)})) or "unknown GPUs"
            warnings.warn(
                f"{self._path}: the engine carries TensorRT plan(s) built for {built}; this runtime has no native "
                f"TensorRT backend yet, so the plans are ignored and the ONNX graphs run on {self.backend!r}",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Full embedding width."""
        return self._dim

    @property
    def fingerprint(self) -> str:
        """Identity of what this embedder computes: a hash of the checksums of the parts it runs
        (graphs, head, tokenizers), its preprocessing and its output. Two engines with the same
        fingerprint give the same vectors; a vector index records it (see `sdk.index`)."""
        return self._fingerprint

    @property
    def matryoshka_dims(self) -> tuple[int, ...]:
        """The prefix widths the model was trained for (increasing, ending at `dim`)."""
        return self._matryoshka

    @property
    def manifest(self) -> dict:
        """A copy of the engine manifest."""
        return copy.deepcopy(self._manifest)

    @property
    def precision(self) -> str:
        """Precision label of the embedder graph (e.g. "fp32", "int8-dynamic")."""
        return self._precision

    @property
    def batch_invariant(self) -> bool:
        """Whether an item's vector is the same alone or in any batch (to float rounding).

        False only for "int8-dynamic" engines, whose activation scale is one per batch; build with
        `moon3 build --int8-activations per-token` for an INT8 engine that is batch-invariant.
        """
        return self._precision != "int8-dynamic"

    @property
    def completes(self) -> tuple[str, ...]:
        """The missing modalities this engine can complete (`embed(..., complete_missing=...)`)."""
        return ("image",) if self._split is not None and self._split.completion_session is not None else ()

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return (f"Embedder({str(self._path)!r}, dim={self._dim}, precision={self._precision!r}, "
                f"backend={self.backend!r})")

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release the ONNX Runtime sessions and the pixel buffers; later calls raise `SdkError`."""
        self._session = None
        self._split = None
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
        items = self._collect(images, texts, traces)
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
        return self._run(self._collect(images, texts, traces), dim, batch_size, fail_fast=False,
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
        if isinstance(records, (str, bytes, Mapping)):
            raise InvalidInputError(
                f"records must be a sequence of dicts (one per product), got a {type(records).__name__}"
            )
        records = list(records)
        images: list[Any] = []
        texts: list[Any] = []
        traces: list[Any] = []
        pre: dict[int, str] = {}
        for i, rec in enumerate(records):
            img = title = trace = None
            if not isinstance(rec, Mapping):
                pre[i] = f"record {i}: is a {type(rec).__name__}, expected a dict with 'title' and optional 'image'"
            else:
                title, trace, img = rec.get("title"), rec.get("trace"), rec.get("image")
                if img is not None and img != "":
                    if not isinstance(img, (str, os.PathLike)):
                        pre[i] = f"record {i}: image must be a path (str), got {type(img).__name__}"
                        img = None
                    else:
                        img = Path(root) / img if root is not None else Path(img)
                else:
                    img = None
            images.append(img)
            texts.append(title)
            traces.append(trace)
        items = self._collect(images, texts, traces, what="record", labels=("image", "title", "trace"), pre=pre)
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

    def _collect(
        self,
        images: Any,
        texts: Any,
        traces: Any,
        *,
        what: str = "item",
        labels: tuple[str, str, str] = ("image", "text", "trace"),
        pre: dict[int, str] | None = None,
    ) -> _Items:
        """Columns -> per-item lists, absent text normalised to None, cheap per-item checks."""
        cols = [_column(images, "images", allow_array=True), _column(texts, "texts"), _column(traces, "traces")]
        given = [c for c in cols if c is not None]
        n = len(given[0]) if given else 0
        if any(len(c) != n for c in given):
            named = zip(("images", "texts", "traces"), cols)
            lens = ", ".join(f"{name} {len(c)}" for name, c in named if c is not None)
            raise InvalidInputError(f"images, texts and traces must have one entry per item, got {lens}")
        imgs, txts, trcs = ([None] * n if c is None else c for c in cols)
        errors: dict[int, str] = {}
        out_texts: list[str | None] = []
        out_traces: list[str | None] = []
        for i in range(n):
            problem = (pre or {}).get(i)
            norm = []
            for label, value in ((labels[1], txts[i]), (labels[2], trcs[i])):
                if value is not None and not isinstance(value, str):
                    problem = problem or f"{what} {i}: {label} must be a str or None, got {type(value).__name__}"
                    value = None
                elif value is not None and (bad := _lone_surrogate(value)) is not None:
                    problem = problem or (f"{what} {i}: {label} is not valid Unicode (lone surrogate at "
                                          f"character {bad}); decode bytes with errors='replace'")
                    value = None
                norm.append(value if value is not None and value.strip() else None)
            text, trace = norm
            if problem is None and imgs[i] is None and text is None and trace is None:
                said = ", ".join(
                    f"no {label}" if v is None else f"{label} is empty/whitespace"
                    for label, v in ((labels[0], imgs[i]), (labels[1], txts[i]), (labels[2], trcs[i]))
                )
                problem = f"{what} {i}: nothing to embed ({said}); give at least one modality"
            if problem is not None:
                errors[i] = problem
            out_texts.append(text)
            out_traces.append(trace)
        return _Items(n, list(imgs), out_texts, out_traces, errors)

    def _run(
        self, items: _Items, dim: int | None, batch_size: int, *, fail_fast: bool, what: str = "item",
        complete: str | None = None,
    ) -> Embeddings:
        # One snapshot for the whole call, so a close() from another thread cannot mix layouts.
        session, split = self._session, self._split
        if session is None or (split is None and self._layout == "split"):
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
        # Absent text is the tokenized "" (presence 0), as in the teacher.
        text_enc = self._text_tok.encode([items.texts[i] or "" for i in good])
        trace_enc = self._trace_tok.encode([items.traces[i] or "" for i in good])
        truncated: dict[int, tuple[str, ...]] = {}
        for i, (_, tcut), (_, scut) in zip(good, text_enc, trace_enc):
            cut = tuple(k for k, c in (("text", tcut), ("trace", scut)) if c)
            if cut:
                truncated[i] = cut
        tok = {i: (t[0], s[0]) for i, t, s in zip(good, text_enc, trace_enc)}
        # Length bucketing: neighbours in this order pad to nearly the same length.
        order = sorted(good, key=lambda i: (len(tok[i][1]), len(tok[i][0]), i))

        full = np.full((items.n, self._dim), np.nan, np.float32)  # (N, D)
        size = self._image_cfg.size
        for start in range(0, len(order), batch_size):
            todo = order[start : start + batch_size]
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
                        image_to_array(load_image(src, name=f"{what} {i} image"), self._image_cfg, out=row)
                    except InvalidInputError as exc:
                        if fail_fast:
                            raise
                        errors[i] = str(exc)
                        continue
                chunk.append(i)
            if not chunk:
                continue
            B = len(chunk)
            pix = buf[:B]  # (B, 3, H, W)
            present = np.zeros((B, 3), np.float32)  # (B, 3)
            for r, i in enumerate(chunk):
                present[r, _IMAGE] = items.images[i] is not None
                present[r, _TEXT] = items.texts[i] is not None
                present[r, _TRACE] = items.traces[i] is not None
            ids, mask = _pad([tok[i][0] for i in chunk])  # (B, T)
            tids, tmask = _pad([tok[i][1] for i in chunk])  # (B, S)
            feed = dict(zip(INPUT_NAMES, (pix, ids, mask, tids, tmask, present)))
            try:
                out = (session.run([self._output], feed)[0] if split is None
                       else split(feed, complete_image=complete == "image"))  # (B, D)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                shapes = {k: tuple(v.shape) for k, v in feed.items()}
                raise EngineError(f"{self._path}: the embedder graph failed on inputs {shapes}: {exc}") from exc
            full[chunk] = out

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
        keep = np.array([i for i in done if i not in errors], dtype=np.int64)
        if dim < self._dim:
            vectors = np.full((items.n, dim), np.nan, np.float32)  # (N, dim)
            if keep.size:
                vectors[keep] = l2_normalize(full[keep], dim)
        else:
            vectors = full  # the graph's output is already L2-normalised
        truncated = {i: c for i, c in truncated.items() if i not in errors}
        return Embeddings(vectors, dict(sorted(errors.items())), truncated)

    def _pixel_buffer(self, rows: int) -> np.ndarray:
        """This thread's reusable (>= rows, 3, H, W) float32 pixel buffer (grown on demand up to
        PIXEL_BUFFER_ROWS rows; a larger batch gets a fresh array each time). Freed when the thread
        ends or the embedder is closed."""
        size = self._image_cfg.size
        if rows > PIXEL_BUFFER_ROWS:
            return np.empty((rows, 3, size, size), np.float32)
        buf = getattr(self._buffers, "pixels", None)
        if buf is None or buf.shape[0] < rows:
            buf = self._buffers.pixels = np.empty((min(max(rows, 8), PIXEL_BUFFER_ROWS), 3, size, size), np.float32)
        return buf

    def _check_dim(self, dim: Any) -> int:
        return check_dim(dim, self._dim, hint=f"the trained widths are {list(self._matryoshka)}")


# ---------------------------------------------------------------------------------------------
# module internals


def _lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (text that cannot be UTF-8, e.g. bytes decoded with
    errors="surrogateescape"), or None; the tokenizer refuses such text for the whole batch."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _column(values: Any, name: str, allow_array: bool = False) -> list[Any] | None:
    """One input column -> a list, refusing a single item passed where a list belongs."""
    if values is None:
        return None
    if isinstance(values, (str, bytes, bytearray, memoryview, os.PathLike, Mapping)):
        raise InvalidInputError(
            f"{name} must be a sequence with one entry per item, got a single {type(values).__name__}; "
            f"wrap it in a list"
        )
    if isinstance(values, np.ndarray):
        if not (allow_array and values.ndim == 4):
            raise InvalidInputError(
                f"{name} must be a sequence with one entry per item, got an array of shape {values.shape}"
                + ("; pass a list of HWC arrays or one (N, H, W, C) uint8 array" if allow_array else "")
            )
        return list(values)
    if allow_array and hasattr(values, "getpixel"):  # a single PIL image
        raise InvalidInputError(
            f"{name} must be a sequence with one entry per item, got a single image; wrap it in a list"
        )
    try:
        return list(values)
    except TypeError:
        raise InvalidInputError(
            f"{name} must be a sequence with one entry per item, got {type(values).__name__}"
        ) from None


def _embedder_spec(engine: EngineFile) -> dict[str, Any]:
    """Read and check the manifest's embedder contract (see sdk.export.bundle)."""
    where = str(engine.path)
    m = engine.manifest
    try:
        emb = m["embedder"]
        pre = m["preprocess"]
        layout = str(emb.get("layout", "single"))
        if layout not in ("single", "split"):
            raise EngineError(f"{where}: unknown embedder layout {layout!r}; install a newer moon3-sdk")
        if layout == "split":
            parts = {k: str(emb["parts"][k]) for k in ("image", "text", "head")}
            inputs = list(INPUT_NAMES)  # the runtime builds the split graphs' feeds itself
        else:
            parts = {"embedder": str(emb["part"])}
            inputs = list(emb["inputs"])
        dim = int(emb["dim"])
        mdims = tuple(int(d) for d in emb["matryoshka_dims"])
        output = str(emb["output"])
        precision = str(emb.get("precision", "fp32"))
        image_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in pre["image"].items()}
        text, trace = pre["text"], pre["trace"]
        text_part, text_len = text["tokenizer"], int(text["max_length"])
        trace_part, trace_len = trace["tokenizer"], int(trace["max_length"])
        if not isinstance(text_part, str) or not isinstance(trace_part, str):
            raise TypeError(f"tokenizer part names must be strings, got {text_part!r}, {trace_part!r}"[:200])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EngineError(
            f"{where}: the manifest has no usable embedder section ({type(exc).__name__}: {exc})"
        ) from exc
    if dim < 1 or not mdims or mdims[-1] != dim or list(mdims) != sorted(set(mdims)) or mdims[0] < 1:
        raise EngineError(f"{where}: inconsistent embedder dims: dim {dim}, matryoshka_dims {list(mdims)}")
    if sorted(inputs) != sorted(INPUT_NAMES):
        raise EngineError(
            f"{where}: the embedder graph takes inputs {inputs}; this sdk feeds {list(INPUT_NAMES)}. "
            "Install the sdk version that built the engine"
        )
    if min(text_len, trace_len) < 2:
        raise EngineError(f"{where}: token budgets must be >= 2, got text {text_len}, trace {trace_len}")
    try:
        image = ImagePreprocess(**image_kw)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"{where}: bad image preprocessing in the manifest: {exc}") from exc
    toks: dict[tuple[str, int], _Tokenizer] = {}
    for p, n in ((text_part, text_len), (trace_part, trace_len)):
        if (p, n) in toks:
            continue
        blob = engine.part(p)
        try:
            toks[p, n] = _Tokenizer(blob.decode("utf-8"), n)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception types
            raise EngineError(f"{where}: tokenizer part {p!r} cannot be loaded: {exc}") from exc
    return {
        "tokenizer_parts": sorted({text_part, trace_part}),
        "layout": layout, "parts": parts, "dim": dim, "matryoshka_dims": mdims, "output": output, "precision": precision,
        "image": image, "text_tokenizer": toks[text_part, text_len], "trace_tokenizer": toks[trace_part, trace_len],
    }


def _fingerprint(engine: EngineFile, spec: dict[str, Any]) -> str:
    sha = {p["name"]: p["sha256"] for p in engine.manifest["parts"]}
    used = sorted(set(spec["parts"].values()) | set(spec["tokenizer_parts"]))
    ident = {"parts": {n: sha[n] for n in used}, "preprocess": engine.manifest.get("preprocess"),
             "layout": spec["layout"], "output": spec["output"], "dim": spec["dim"]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _check_split_graphs(image, text, where: Path, size: int, skip_path: bool = False) -> None:
    """The split engine's graphs take and give what `sdk.head.SplitRunner` feeds and reads."""
    from sdk.head import image_graph_outputs

    for sess, ins, outs, what in ((image, ["pixels"], image_graph_outputs(skip_path), "image"),
                                  (text, ["input_ids", "attention_mask"], ["token_states"], "text")):
        got_in = sorted(i.name for i in sess.get_inputs())
        got_out = [o.name for o in sess.get_outputs()]
        if got_in != sorted(ins) or any(o not in got_out for o in outs):
            raise EngineError(f"{where}: the {what} graph has inputs {got_in} / outputs {got_out}, "
                              f"expected {ins} / {outs}")
    _check_pixels(image.get_inputs()[0].shape, where, "the image graph's", size)


def _completion_part(section: Any, where: Path) -> str:
    """The part name of the manifest's "completion" section (see sdk.export.bundle.completion_parts)."""
    try:
        if section["completes"] != "image":
            raise ValueError(f"it completes {section['completes']!r}; this sdk completes only 'image'")
        return str(section["part"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(
            f"{where}: the manifest's completion section is unusable ({type(exc).__name__}: {exc})"
        ) from exc


def _check_completion_graph(session, where: Path, head) -> None:
    """The completion graph takes title token states and gives image tokens the head can read."""
    got_in = sorted(i.name for i in session.get_inputs())
    outs = {o.name: o for o in session.get_outputs()}
    if got_in != ["attention_mask", "token_states"] or "image_tokens" not in outs:
        raise EngineError(f"{where}: the completion graph has inputs {got_in} / outputs {sorted(outs)}, expected "
                          f"['attention_mask', 'token_states'] / ['image_tokens']")
    shape = outs["image_tokens"].shape
    n_tok = int(head.config.get("n_image_tokens", 49))
    if len(shape) != 3 or any(isinstance(s, int) and s != w for s, w in zip(shape[1:], (n_tok, head.d))):
        raise EngineError(f"{where}: the completion graph gives image tokens of shape {shape}; the head reads "
                          f"(batch, {n_tok}, {head.d})")


def _check_pixels(shape, where: Path, graph: str, size: int) -> None:
    if len(shape) != 4 or any(isinstance(s, int) and s != size for s in shape[2:]):
        raise EngineError(f"{where}: {graph} pixels input is {shape}, the manifest preprocesses to {size}x{size}")


def _check_graph(session, where: Path, output: str, dim: int, size: int) -> None:
    """The loaded graph takes the ABI inputs and gives `output` of width `dim`."""
    ins = {i.name: i for i in session.get_inputs()}
    if sorted(ins) != sorted(INPUT_NAMES):
        raise EngineError(f"{where}: the embedder graph has inputs {sorted(ins)}, expected {list(INPUT_NAMES)}")
    _check_pixels(ins["pixels"].shape, where, "the graph's", size)
    outs = {o.name: o for o in session.get_outputs()}
    if output not in outs:
        raise EngineError(f"{where}: the embedder graph has no output {output!r} (it has {sorted(outs)})")
    width = outs[output].shape[-1] if outs[output].shape else None
    if isinstance(width, int) and width != dim:
        raise EngineError(f"{where}: the graph's output is {width} wide, the manifest says dim {dim}")
