"""Think-then-embed: the engine's reasoner writes, the embedder embeds, with a persistent cache.

    from sdk import Pipeline
    p = Pipeline("moon3.engine", complete_title=True, trace_cache="traces.sqlite")
    v = p.embed(images=["a.jpg", "b.jpg"], texts=["Puma Men Blue T-shirt", None], ids=[17, 18])
    p.last_generated     # {1: {"caption": "..."}}: what the reasoner wrote for which item

Two uses of the reasoner:
- `complete_title=True` (MMPCBench's missing-modality completion): an item with a photo but no
  title gets a title written from its photo (`last_generated`). How far the vector trusts it is
  `written_title_weight`: 0 (the default) keeps the photo's vector, w > 0 adds w times the
  written title's text vector to it, "joint" fuses it as if it were the real title. Measured on
  leak-free validation photos (docs/missing-modalities.md), the reasoner's titles cost photo ->
  title recall when fused (R@10 0.741 -> 0.391) and about half a point at w = 0.1.
- `complete_image=True` (the other direction, no reasoner needed): an item with a title but no
  photo gets image tokens completed from its title by the engine's completion part, and is
  embedded as title + that image (`Embedder.embed(..., complete_missing="image")`).
- `reason="on"` / `"cached"` (Think-Then-Embed): every item gets a `<think> ... </think>` trace,
  fed to the embedder's trace modality. This needs an embedder trained with traces (the
  manifest says so with `embedder.trace_trained`); an engine whose embedder never saw traces
  refuses it rather than feed an untrained modality.

Generated text is cached in SQLite, keyed by the reasoner (its parts' checksums, task templates
and length limit), the task, the token budget and the item (its id, or a hash of its photo bytes
and title), so a catalog's side is generated once, offline, and a query pays only for what is new.
Never imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from sdk.errors import EngineError, InvalidInputError

if TYPE_CHECKING:
    from sdk.reasoner import Reasoner

REASON = ("off", "on", "cached")
CAPTION_TOKENS = 96  # the token budget of a completed title
JOINT = "joint"  # written_title_weight: fuse a written title as if it were the real one
# The cache file's schema (SQLite `user_version`). 0: a new file, or the unversioned first schema
# (table "generated", keyed without the token budget). 2: table "texts", keyed with it.
CACHE_SCHEMA = 2


class TextCache:
    """Generated texts in SQLite: (reasoner fingerprint, kind, token budget, item key) -> text. Thread-safe.

    A file written before the budget was part of the key cannot tell which budget wrote each
    text: its entries are discarded once, with a RuntimeWarning, and regenerated when asked for.

    Raises:
        InvalidInputError: the file is not SQLite, or was written by a newer sdk (its schema is
            named in the message).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False)
            try:
                stale = self._prepare()
            except BaseException:
                self._db.close()
                raise
        except sqlite3.DatabaseError as exc:
            raise InvalidInputError(f"{self.path}: not a usable trace cache ({exc})") from exc
        if stale:
            warnings.warn(f"{self.path}: this trace cache was written by an older sdk without the token budget in "
                          f"its key; its {stale} entries were discarded and will be regenerated",
                          RuntimeWarning, stacklevel=3)

    def _version(self) -> int:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > CACHE_SCHEMA:
            raise InvalidInputError(f"{self.path}: trace cache schema {version} was written by a newer sdk; "
                                    f"this one reads schema {CACHE_SCHEMA}")
        return version

    def _prepare(self) -> int:
        """Create or upgrade the schema; the number of old entries discarded. A file already at
        this schema is not written to (a read-only cache opens), and an upgrade holds the write
        lock from its check to its commit (two processes opening one old file upgrade it once)."""
        if self._version() == CACHE_SCHEMA:
            return 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            stale = 0
            if self._version() < CACHE_SCHEMA and self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='generated'").fetchone():
                stale = self._db.execute("SELECT COUNT(*) FROM generated").fetchone()[0]
                self._db.execute("DROP TABLE IF EXISTS generated")
            self._db.execute("CREATE TABLE IF NOT EXISTS texts (reasoner TEXT, kind TEXT, budget INTEGER, key TEXT, "
                             "text TEXT, PRIMARY KEY (reasoner, kind, budget, key))")
            self._db.execute(f"PRAGMA user_version = {CACHE_SCHEMA}")
            self._db.commit()
        except BaseException:
            self._db.rollback()
            raise
        return stale

    def get(self, reasoner: str, kind: str, budget: int, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT text FROM texts WHERE reasoner=? AND kind=? AND budget=? AND key=?",
                                   (reasoner, kind, budget, key)).fetchone()
        return None if row is None else row[0]

    def put(self, reasoner: str, kind: str, budget: int, key: str, text: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO texts VALUES (?, ?, ?, ?, ?)", (reasoner, kind, budget, key, text))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM texts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def item_key(image: Any, text: str | None, item_id: Any = None) -> str:
    """The cache key of an item: its id when given, else a hash of its photo bytes and title."""
    if item_id is not None:
        return f"id:{item_id}"
    h = hashlib.sha256()
    if image is not None:
        if isinstance(image, (str, os.PathLike)):
            try:
                h.update(Path(image).read_bytes())
            except OSError:
                h.update(str(image).encode())  # unreadable: the embedder reports it
        elif isinstance(image, (bytes, bytearray, memoryview)):
            h.update(bytes(image))
        elif isinstance(image, np.ndarray):
            h.update(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes())
        elif hasattr(image, "tobytes"):
            h.update(repr(getattr(image, "size", "")).encode() + image.tobytes())
        else:
            h.update(repr(image).encode())
    h.update(b"\x00" + (text or "").encode("utf-8", "surrogatepass"))
    return "sha256:" + h.hexdigest()


class Pipeline:
    """Reasoner + embedder over one engine.

    Args:
        path: a `moon3.engine` with an embedder and a reasoner.
        reason: "off" (no traces), "on" (generate a trace per item) or "cached" (as "on", and
            reuse / store traces in `trace_cache`).
        complete_title: write a title from the photo for items that have a photo but no title.
        written_title_weight: how a written title enters the item's vector: a float w >= 0 gives
            normalise(photo vector + w * the title's text-only vector), the title as a separate,
            down-weighted modality (0, the default: the photo's vector, the title only written);
            "joint" fuses photo and written title as a real pair.
        trace_cache: SQLite file for generated titles and traces (None: no cache; required for
            "cached"). Texts are keyed by reasoner, task, token budget and item, so a trace
            written with another `max_trace_tokens` is generated anew.
        max_trace_tokens: the reasoning budget per item (an int >= 0).
        threads: onnxruntime threads of both models.
        complete_image: complete the image tokens of items that have a title but no photo from
            their title (needs an engine with a completion part).
        providers: backend names for both models, as `sdk.Embedder` takes them (None: ["cpu"]).
        cache: deprecated name of `trace_cache`.

    The reasoner is loaded (its graphs read, verified and handed to ONNX Runtime) only when a
    title or trace must really be generated: never with reason="off" and no title completion,
    and with reason="cached" only on the first cache miss. A damaged reasoner part therefore
    surfaces as an EngineError from the `embed` call that first needs it.

    Raises:
        ValueError: a bad `reason` or `max_trace_tokens`, "cached" without a cache, both
            `trace_cache` and `cache`, an unknown backend name or bad `threads`.
        BackendUnavailableError: a requested backend is not in this onnxruntime build.
        InvalidInputError: `trace_cache` is not a usable trace cache file.
        EngineError: the engine file is damaged, the engine has no reasoner although one is
            needed, reason is not "off" and its embedder was not trained with traces, or
            complete_image=True and the engine has no completion part.

    Warns:
        DeprecationWarning: `cache=` was given (use `trace_cache=`).
        RuntimeWarning: a requested backend is not active (see `sdk.Embedder`); the reasoner
            warns too, when it is loaded.
    """

    def __init__(self, path: str | os.PathLike, reason: str = "off", complete_title: bool = False,
                 trace_cache: str | os.PathLike | None = None, max_trace_tokens: int = 96,
                 threads: int | None = None, complete_image: bool = False,
                 providers: str | Sequence[str] | None = None, *, cache: str | os.PathLike | None = None,
                 written_title_weight: float | str = 0.0):
        from sdk.embedder import Embedder
        from sdk.engine import EngineFile

        if cache is not None:
            if trace_cache is not None:
                raise ValueError("give trace_cache= only; cache= is its deprecated name")
            warnings.warn("Pipeline(cache=...) is deprecated; use trace_cache=...", DeprecationWarning, stacklevel=2)
            trace_cache = cache
        if reason not in REASON:
            raise ValueError(f"reason must be one of {REASON}, got {reason!r}")
        if reason == "cached" and trace_cache is None:
            raise ValueError('reason="cached" needs a cache file (trace_cache="traces.sqlite")')
        if isinstance(max_trace_tokens, bool) or not isinstance(max_trace_tokens, int) or max_trace_tokens < 0:
            raise ValueError(f"max_trace_tokens must be an int >= 0, got {max_trace_tokens!r}")
        w = written_title_weight
        if w != JOINT and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf")):
            raise ValueError(f'written_title_weight must be a finite number >= 0 or "joint", got {w!r}')
        self.written_title_weight = w if w == JOINT else float(w)
        # One open file serves both models, so the reasoner loaded later reads the very file the
        # embedder was loaded from (each part verified when read), even if the path is replaced.
        self._engine: EngineFile | None = EngineFile.open(path)
        try:
            self.embedder = Embedder(self._engine, providers=providers, threads=threads)
            manifest = self.embedder.manifest  # a copy
            if reason != "off" and not manifest.get("embedder", {}).get("trace_trained", False):
                raise EngineError(f"{path}: this engine's embedder was not trained with reasoning traces; "
                                  f'use reason="off" (complete_title=True still uses the reasoner)')
            if complete_image and "image" not in self.embedder.completes:
                raise EngineError(f"{path}: this engine has no image completion part; build it with the completion "
                                  f"weights (sdk/train/weights/completion) or use complete_image=False")
            if (reason != "off" or complete_title) and not isinstance(manifest.get("reasoner"), dict):
                raise EngineError(f"{path}: this engine has no reasoner; build one with `moon3 build --reasoner`")
            if reason == "off" and not complete_title:
                self._engine.close()  # the reasoner is never needed
                self._engine = None
        except BaseException:
            self._engine.close()
            raise
        self.complete_image = bool(complete_image)
        self._reasoner: Reasoner | None = None
        self._threads, self._providers = threads, providers
        self._reasoner_lock = threading.Lock()
        parts = {p["name"]: p["sha256"] for p in manifest.get("parts", [])}
        spec = manifest.get("reasoner") or {}
        # what decides the generated text besides task, budget and item: the graphs and tokenizer,
        # the prompt templates, the length limit and the photo preprocessing
        self.fingerprint = hashlib.sha256(json.dumps(
            [[parts.get(n) for n in sorted((spec.get("parts") or {}).values())],
             spec.get("tasks"), spec.get("max_len"), spec.get("image")], sort_keys=True).encode()).hexdigest()[:16]
        self.reason, self.complete_title, self.max_trace_tokens = reason, complete_title, max_trace_tokens
        try:
            self.trace_cache = TextCache(trace_cache) if trace_cache is not None else None
        except BaseException:
            self.embedder.close()
            if self._engine is not None:
                self._engine.close()
            raise
        self.last_generated: dict[int, dict[str, str]] = {}
        self.cache_hits = 0

    @property
    def cache(self) -> TextCache | None:
        """Deprecated name of `trace_cache`."""
        warnings.warn("Pipeline.cache is deprecated; use Pipeline.trace_cache", DeprecationWarning, stacklevel=2)
        return self.trace_cache

    @property
    def reasoner_loaded(self) -> bool:
        """Whether the reasoner's graphs have been read and loaded (they are, on the first item
        that needs generated text: never with reason="off" and no title completion, and with
        reason="cached" only on a cache miss)."""
        return self._reasoner is not None

    @property
    def reasoner(self) -> Reasoner | None:
        """The engine's reasoner, loaded on first use; None when this pipeline never generates.

        Raises:
            EngineError: a reasoner part is damaged (checksum mismatch) or cannot be loaded.
        """
        if self._reasoner is None and self._engine is not None:
            from sdk.reasoner import Reasoner

            with self._reasoner_lock:
                if self._reasoner is None:
                    self._reasoner = Reasoner(self._engine, threads=self._threads, providers=self._providers)
                    self._engine.close()  # every part needed is in memory now
        return self._reasoner

    def _text(self, kind: str, budget: int, key, make) -> str:
        """`make()`, or its cached text; `key()` (which may read the photo file) runs only with a cache."""
        if self.trace_cache is None:
            return make()
        k = key()
        hit = self.trace_cache.get(self.fingerprint, kind, budget, k)
        if hit is not None:
            self.cache_hits += 1
            return hit
        text = make()
        self.trace_cache.put(self.fingerprint, kind, budget, k, text)
        return text

    def embed(self, images: Sequence[Any] | None = None, texts: Sequence[str | None] | None = None, *,
              ids: Sequence[Any] | None = None, dim: int | None = None, errors: str = "report") -> np.ndarray:
        """Embed items after letting the reasoner complete titles and/or write traces.

        Items the reasoner cannot read (a bad photo) are left as they are; the embedder then
        reports them as usual (`BatchError` with per-index messages, or raises with errors="raise").
        """
        n = len(images) if images is not None else len(texts) if texts is not None else 0
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        if len(images) != n or len(texts) != n or (ids is not None and len(ids) != n):
            raise InvalidInputError("images, texts and ids must have one entry per item")
        self.last_generated = {}
        written: dict[int, str] = {}  # completed titles kept out of the fusion (written_title_weight a number)
        traces: list[str | None] = [None] * n
        for i in range(n):
            img, txt = images[i], texts[i]
            title = txt.strip() if isinstance(txt, str) and txt.strip() else None
            key = functools.partial(item_key, img, title, None if ids is None else ids[i])  # the given title
            try:
                if self.complete_title and title is None and img is not None:
                    title = self._text("caption", CAPTION_TOKENS, key, lambda: self.reasoner.generate(
                        image=img, task="caption", max_new_tokens=CAPTION_TOKENS))
                    self.last_generated.setdefault(i, {})["caption"] = title
                    if self.written_title_weight == JOINT:
                        texts[i] = title
                    elif title:
                        written[i] = title
                if self.reason != "off" and (img is not None or title):
                    trace = self._text("trace", self.max_trace_tokens, key, lambda: self.reasoner.generate(
                        image=img, text=title, task="trace", max_new_tokens=self.max_trace_tokens))
                    traces[i] = trace
                    self.last_generated.setdefault(i, {})["trace"] = trace
            except InvalidInputError:
                continue  # the embedder reports the bad input for this index
        from sdk.errors import BatchError

        kw = dict(dim=dim, errors=errors, complete_missing="image" if self.complete_image else None)
        try:
            out = self.embedder.embed(images, texts, traces if self.reason != "off" else None, **kw)
        except BatchError as exc:
            self._add_written(exc.vectors, written, dim)
            raise
        return self._add_written(out, written, dim)

    def _add_written(self, vectors: np.ndarray, written: dict[int, str], dim: int | None) -> np.ndarray:
        """Rows of `written` (index -> written title) in place: normalise(row + w * title vector)."""
        w = self.written_title_weight
        rows = [i for i in written if np.isfinite(vectors[i]).all()]
        if not rows or w == JOINT or w == 0.0:
            return vectors
        t = self.embedder.embed(texts=[written[i] for i in rows], dim=dim)
        mixed = vectors[rows] + np.float32(w) * t
        vectors[rows] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
        return vectors

    def close(self) -> None:
        self.embedder.close()
        if self._engine is not None:
            self._engine.close()
        if self.trace_cache is not None:
            self.trace_cache.close()
