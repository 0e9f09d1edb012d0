"""Nearest-neighbour search over product vectors: faiss when it is installed, NumPy otherwise.

    from sdk import Embedder
    from sdk.index import IndexConfig, VectorIndex

    emb = Embedder("moon3.engine")
    vectors = emb.embed_products(records, root="catalog/")           # (N, 256), unit rows
    index = VectorIndex.build(vectors, [r["id"] for r in records], embedder=emb)
    index.save("catalog.index")
    index = VectorIndex.load("catalog.index", embedder=emb)          # refuses an index of another engine
    scores, ids = index.search(emb.embed(texts=["red running shoe"]), k=10)
    index.backend                                                    # "faiss" or "numpy"

Vectors are L2-normalised, so the inner product is the cosine. The default index is exact
(`IndexConfig()`, faiss `IndexFlatIP`); for large catalogs `IndexConfig.hnsw(...)` and
`IndexConfig.ivf(...)` build approximate faiss indexes. Without faiss (`pip install
'moon3-sdk[search]'`) every kind is searched exactly with NumPy, which gives the same top-k as the
exact faiss index (a warning says so when an approximate kind was asked for).

An index folder holds `index.json` (format version, dims, kind, the embedder's fingerprint and
the SHA-256 of every other file), `vectors.npy`, `ids.json` and, for the approximate kinds,
`faiss.index`. Loading verifies every checksum before anything is parsed; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sdk.errors import BackendUnavailableError, IndexFileError, InvalidInputError
from sdk.paths import file_sha256

FORMAT = "moon3-index"
FORMAT_VERSION = 1
KINDS = ("flat", "hnsw", "ivf")
BACKENDS = ("faiss", "numpy")
MANIFEST = "index.json"
_INSTALL = "pip install 'moon3-sdk[search]' (faiss-cpu)"


def _faiss():
    """The faiss module, or None when it is not installed (imported lazily: it is optional)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def available_backends() -> list[str]:
    """Search backends usable here, best first: ["faiss", "numpy"] or ["numpy"]."""
    return (["faiss"] if _faiss() is not None else []) + ["numpy"]


@dataclass(frozen=True)
class IndexConfig:
    """How to index: "flat" (exact inner product), "hnsw" or "ivf" (approximate, faiss only).

    Use `IndexConfig()` (exact), `IndexConfig.hnsw(m, ef_search)` or `IndexConfig.ivf(nlist, nprobe)`.
    """

    kind: str = "flat"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    nlist: int = 0  # ivf lists; 0: about 4 * sqrt(N) at build time
    nprobe: int = 8

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.nlist, bool) or not isinstance(self.nlist, int) or self.nlist < 0:
            raise ValueError(f"nlist must be an int >= 0 (0: automatic), got {self.nlist!r}")

    @classmethod
    def flat(cls) -> "IndexConfig":
        return cls("flat")

    @classmethod
    def hnsw(cls, m: int = 32, ef_search: int = 64, ef_construction: int = 80) -> "IndexConfig":
        return cls("hnsw", hnsw_m=m, ef_search=ef_search, ef_construction=ef_construction)

    @classmethod
    def ivf(cls, nlist: int = 0, nprobe: int = 8) -> "IndexConfig":
        return cls("ivf", nlist=nlist, nprobe=nprobe)


def _check_ids(ids: Sequence[Any], n: int) -> list[int | str]:
    if isinstance(ids, (str, bytes)):
        raise InvalidInputError("ids must be a sequence with one id (int or str) per vector")
    ids = list(ids)
    if len(ids) != n:
        raise InvalidInputError(f"got {len(ids)} ids for {n} vectors")
    out: list[int | str] = []
    for i, x in enumerate(ids):
        if isinstance(x, np.integer):
            x = int(x)
        if isinstance(x, bool) or not isinstance(x, (int, str)):
            raise InvalidInputError(f"id {i} is a {type(x).__name__}; ids must be ints or strs")
        out.append(x)
    if len(set(out)) != len(out):
        seen: set = set()
        dup = next(x for x in out if x in seen or seen.add(x))
        raise InvalidInputError(f"id {dup!r} is given more than once; ids must be unique")
    return out


def _check_vectors(vectors: Any, dim: int | None, what: str) -> np.ndarray:
    try:
        v = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} must be a float array: {exc}") from None
    if v.ndim == 1 and what == "queries":
        v = v[None]
    if v.ndim != 2 or (dim is not None and v.shape[1] != dim) or v.shape[1] < 1:
        want = f"(n, {dim})" if dim is not None else "(n, dim)"
        raise InvalidInputError(f"{what} must be {want}, got shape {v.shape}")
    if not np.isfinite(v).all():
        bad = int(np.flatnonzero(~np.isfinite(v).all(1))[0])
        raise InvalidInputError(f"{what} row {bad} is not finite (NaN/inf): leave out items that failed to embed")
    return np.ascontiguousarray(v)


class VectorIndex:
    """Top-k inner-product search over vectors with ids. Build with `build`, or `load` a saved one.

    Attributes:
        dim: vector width.
        kind: "flat", "hnsw" or "ivf".
        backend: "faiss" or "numpy": what really searches.
        engine: identity of the embedder that made the vectors ({"fingerprint", "dim",
            "precision", "name"}), or {} when unknown.
    """

    def __init__(self, vectors: np.ndarray, ids: list[int | str], config: IndexConfig, backend: str,
                 engine: dict[str, Any], faiss_index: Any = None):
        self._vectors = vectors  # (N, dim) float32
        self._ids = np.asarray(ids, dtype=object)
        self.config = config
        self.kind = config.kind
        self.dim = int(vectors.shape[1])
        self.backend = backend
        self.engine = dict(engine)
        self._faiss_index = faiss_index

    # ------------------------------------------------------------------ build / save / load

    @classmethod
    def build(cls, vectors: Any, ids: Sequence[Any], config: IndexConfig | None = None, *, embedder: Any = None,
              backend: str | None = None, threads: int | None = None) -> "VectorIndex":
        """Index `vectors` (N, dim) under `ids` (unique ints or strs).

        Args:
            vectors: L2-normalised rows (as `Embedder.embed` returns them).
            ids: one id per row.
            config: the index kind (default: exact).
            embedder: the `sdk.Embedder` that made the vectors; its fingerprint is recorded so that
                a search with another engine is refused.
            backend: "faiss", "numpy" or None (faiss when installed, else NumPy).
            threads: faiss OpenMP threads (None: its default).

        Raises:
            InvalidInputError: bad vectors or ids.
            BackendUnavailableError: backend="faiss" without faiss installed.
            ValueError: an unknown backend, or an IVF with more lists than vectors.
        """
        config = config or IndexConfig()
        v = _check_vectors(vectors, None, "vectors")
        if len(v) == 0:
            raise InvalidInputError("nothing to index: no vectors")
        ids = _check_ids(ids, len(v))
        engine = _engine_identity(embedder, v.shape[1]) if embedder is not None else {}
        backend = _pick_backend(backend, config)
        _set_threads(backend, threads)
        faiss_index = _faiss_build(v, config) if backend == "faiss" else None
        return cls(v, ids, config, backend, engine, faiss_index)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index into `folder` (created if needed; an index already there is replaced).

        `index.json` is written last: a save interrupted half-way leaves a folder that `load`
        refuses (a checksum or a file is missing), never a silently partial index.

        Returns:
            The folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        files = {"vectors.npy": lambda f: np.save(f, self._vectors, allow_pickle=False),
                 "ids.json": lambda f: f.write(json.dumps(self._ids.tolist()).encode())}
        if self._faiss_index is not None and self.kind != "flat":
            faiss = _faiss()
            files["faiss.index"] = lambda f: f.write(faiss.serialize_index(self._faiss_index).tobytes())
        else:
            (folder / "faiss.index").unlink(missing_ok=True)
        sums = {}
        for name, write in files.items():
            with open(folder / name, "wb") as f:
                write(f)
            sums[name] = file_sha256(folder / name)
        from sdk.version import __version__

        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dim": self.dim, "count": len(self),
                    "metric": "inner_product", "config": asdict(self.config), "engine": self.engine,
                    "files": sums, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "versions": {"moon3-sdk": __version__, "faiss": getattr(_faiss(), "__version__", None)}}
        tmp = folder / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, folder / MANIFEST)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, embedder: Any = None, backend: str | None = None,
             threads: int | None = None) -> "VectorIndex":
        """Load an index folder written by `save`, verifying every file's checksum first.

        Args:
            folder: the index folder.
            embedder: the `sdk.Embedder` that will embed the queries: an index built with another
                engine (another fingerprint) or a width it does not give is refused.
            backend: "faiss", "numpy" or None (faiss when installed). An approximate index loaded
                with the NumPy backend is searched exactly.
            threads: faiss OpenMP threads (None: its default).

        Raises:
            IndexFileError: no index there, a missing, damaged or tampered file, an unsupported
                format version, or an index of another engine.
            BackendUnavailableError: backend="faiss" without faiss installed.
        """
        folder = Path(folder)
        man_path = folder / MANIFEST
        dim, count, sums, config, engine = _read_manifest(folder, man_path)
        need = ["vectors.npy", "ids.json"] + (["faiss.index"] if "faiss.index" in sums else [])
        for name in need:
            path = folder / name
            if name not in sums:
                raise IndexFileError(f"{man_path}: the manifest lists no checksum for {name}")
            if not path.is_file():
                raise IndexFileError(f"{folder}: {name} is missing; the index is incomplete (rebuild it)")
            if file_sha256(path) != sums[name]:
                raise IndexFileError(f"{path}: checksum mismatch; the index file was modified or corrupted (rebuild it)")
        try:
            v = np.load(folder / "vectors.npy", allow_pickle=False)
            ids = json.loads((folder / "ids.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise IndexFileError(f"{folder}: unreadable index data ({type(exc).__name__}: {exc})") from None
        if v.dtype != np.float32 or v.shape != (count, dim) or not np.isfinite(v).all():
            raise IndexFileError(f"{folder}: vectors.npy is {v.dtype} {v.shape}, the manifest says float32 ({count}, {dim})")
        try:
            ids = _check_ids(ids if isinstance(ids, list) else (), count)
        except InvalidInputError as exc:
            raise IndexFileError(f"{folder}: bad ids.json ({exc})") from None
        if embedder is not None:
            _check_engine(folder, engine, dim, embedder)
        backend = _pick_backend(backend, config)
        _set_threads(backend, threads)
        faiss_index = _load_faiss(folder, v, config, count, dim, "faiss.index" in need) if backend == "faiss" else None
        return cls(np.ascontiguousarray(v), ids, config, backend, engine, faiss_index)

    # ------------------------------------------------------------------ search

    def __len__(self) -> int:
        return int(self._vectors.shape[0])

    @property
    def ids(self) -> list[int | str]:
        return self._ids.tolist()

    def check_engine(self, embedder: Any) -> None:
        """Refuse (IndexFileError) an embedder other than the one that built this index."""
        _check_engine(Path("<index>"), self.engine, self.dim, embedder)

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest vectors of each query by inner product (cosine for unit vectors).

        Args:
            queries: (Q, dim) or (dim,) float rows.
            k: results per query (at most the index size).

        Returns:
            (scores, ids): (Q, k') float32 best first, and (Q, k') object array of ids, with
            k' = min(k, len(index)).

        Raises:
            InvalidInputError: queries of another width, non-finite values, or k < 1.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be an int >= 1, got {k!r}")
        q = _check_vectors(queries, self.dim, "queries")
        k = int(min(k, len(self)))
        if self._faiss_index is not None:
            scores, pos = self._faiss_index.search(q, k)
            if (pos < 0).any():  # an approximate index may find fewer than k: drop the empty slots
                scores = np.where(pos < 0, -np.inf, scores).astype(np.float32)
        else:
            scores, pos = _numpy_topk(self._vectors, q, k)
        ids = np.empty(pos.shape, dtype=object)
        ids[...] = None
        ok = pos >= 0
        ids[ok] = self._ids[pos[ok]]
        return scores.astype(np.float32, copy=False), ids


def _numpy_topk(vectors: np.ndarray, q: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (Q, k) scores best first and positions, ties by position."""
    n = len(vectors)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_p = np.zeros((len(q), 0), np.int64)
    for s in range(0, n, chunk):
        sims = q @ vectors[s : s + chunk].T  # (Q, c)
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < sims.shape[1] else np.tile(
            np.arange(sims.shape[1]), (len(q), 1))
        best_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], 1)
        best_p = np.concatenate([best_p, part + s], 1)
        order = np.lexsort((best_p, -best_s), axis=1)[:, :k]
        best_s, best_p = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_p, order, 1)
    return best_s, best_p


def _pick_backend(backend: str | None, config: IndexConfig) -> str:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; available: {available_backends()}")
    have = _faiss() is not None
    if backend == "faiss" and not have:
        raise BackendUnavailableError(f"the faiss search backend is not installed: {_INSTALL}")
    chosen = backend or ("faiss" if have else "numpy")
    if chosen == "numpy" and config.kind != "flat":
        why = "backend='numpy' was asked for" if have else f"faiss is not installed ({_INSTALL})"
        warnings.warn(f"a {config.kind!r} index is searched exactly with NumPy: {why}", RuntimeWarning, stacklevel=3)
    return chosen


def _set_threads(backend: str, threads: int | None) -> None:
    if threads is None or backend != "faiss":
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    _faiss().omp_set_num_threads(threads)


def _faiss_build(v: np.ndarray, config: IndexConfig):
    faiss = _faiss()
    n, d = v.shape
    if config.kind == "flat":
        index = faiss.IndexFlatIP(d)
        _use_blas_for_query_batches(faiss, d)
    elif config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
    else:
        nlist = config.nlist or max(1, int(4 * np.sqrt(n)))
        if nlist > n:
            raise ValueError(f"an IVF index with {nlist} lists needs at least {nlist} vectors, got {n}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # small catalogs: no warning about few training points
        index.train(v)
    index.add(v)
    _set_search_params(index, config)
    return index


BLAS_QUERY_THRESHOLD = 20


def _use_blas_for_query_batches(faiss, dim: int) -> None:
    """Let an exact faiss search of a batch of queries run as one matrix product (BLAS).

    faiss picks BLAS over its per-query scan above `distance_compute_blas_threshold`. With
    faiss-cpu 1.15.1's shipped value (128,000), 32 queries over 50k 256-d vectors took the scan:
    122 ms against NumPy's 25 ms (benchmarks/test_bench_search.py, one thread); at 20 x dim they
    take one matrix product (23 ms) while single queries keep the scan (at 20 they went to BLAS
    too, 4.6x slower over 8.5k vectors). The setting is process-wide; it is only ever lowered
    here, and changes the kernel, not the results (the same exact top-k)."""
    cvar = faiss.cvar
    target = BLAS_QUERY_THRESHOLD * dim
    if getattr(cvar, "distance_compute_blas_threshold", 0) > target:
        cvar.distance_compute_blas_threshold = target


def _set_search_params(index, config: IndexConfig) -> None:
    if config.kind == "hnsw":
        index.hnsw.efSearch = config.ef_search
    elif config.kind == "ivf":
        index.nprobe = config.nprobe


def _engine_identity(embedder: Any, dim: int) -> dict[str, Any]:
    if dim not in range(1, embedder.dim + 1):
        raise InvalidInputError(f"the vectors are {dim} wide; this engine gives at most {embedder.dim}")
    return {"fingerprint": embedder.fingerprint, "dim": int(embedder.dim), "precision": embedder.precision,
            "name": Path(getattr(embedder, "path", "") or "").name}


def _check_engine(folder: Path, engine: dict[str, Any], dim: int, embedder: Any) -> None:
    fp = engine.get("fingerprint")
    if not fp:
        raise IndexFileError(f"{folder}: the index records no engine, so its vectors cannot be matched to "
                             f"{getattr(embedder, 'path', 'this engine')}; rebuild it with `moon3 index build`")
    if fp != embedder.fingerprint:
        raise IndexFileError(
            f"{folder}: the index was built with another engine ({engine.get('name') or '?'}, embedder "
            f"fingerprint {str(fp)[:16]}, {engine.get('precision')}) than {getattr(embedder, 'path', 'this one')} "
            f"(fingerprint {embedder.fingerprint[:16]}, {embedder.precision}); its vectors are not comparable: "
            "rebuild the index with this engine"
        )
    if dim > embedder.dim:
        raise IndexFileError(f"{folder}: the index holds {dim}-d vectors; this engine gives at most {embedder.dim}")


def _read_manifest(folder: Path, man_path: Path) -> tuple[int, int, dict, IndexConfig, dict]:
    """An index folder's manifest, checked -> (dim, count, file checksums, config, engine record)."""
    if not man_path.is_file():
        raise IndexFileError(f"{folder}: no vector index here (no {MANIFEST}); build one with `moon3 index build`")
    try:
        man = json.loads(man_path.read_text(encoding="utf-8"))
        if not isinstance(man, dict):
            raise TypeError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise IndexFileError(f"{man_path}: not a readable index manifest ({type(exc).__name__}: {exc})") from None
    if man.get("format") != FORMAT:
        raise IndexFileError(f"{man_path}: not a moon3 vector index (format {str(man.get('format'))[:40]!r})")
    if man.get("format_version") != FORMAT_VERSION:
        raise IndexFileError(f"{man_path}: index format version {str(man.get('format_version'))[:20]} is not "
                             f"supported by this sdk (reads version {FORMAT_VERSION}); rebuild the index")
    try:
        dim, count, sums = man["dim"], man["count"], man["files"]
        config = IndexConfig(**man["config"])
        engine = man.get("engine") or {}
        if type(dim) is not int or type(count) is not int or dim < 1 or count < 1:
            raise ValueError(f"dim {dim!r} and count {count!r} must be positive ints")
        if not isinstance(sums, dict) or not isinstance(engine, dict):
            raise TypeError("files and engine must be objects")
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFileError(f"{man_path}: malformed index manifest ({type(exc).__name__}: {exc})") from None
    return dim, count, sums, config, engine


def _load_faiss(folder: Path, v: np.ndarray, config: IndexConfig, count: int, dim: int, saved: bool):
    """The faiss index of a loaded folder: its saved faiss.index (checked against the manifest), or
    one built from the vectors when none was saved."""
    if not saved:
        return _faiss_build(v, config)
    faiss = _faiss()
    raw = np.frombuffer((folder / "faiss.index").read_bytes(), dtype=np.uint8)
    try:
        faiss_index = faiss.deserialize_index(raw)
    except RuntimeError as exc:
        raise IndexFileError(f"{folder}: faiss cannot read faiss.index ({exc})") from None
    if faiss_index.ntotal != count or faiss_index.d != dim:
        raise IndexFileError(f"{folder}: faiss.index holds {faiss_index.ntotal} x {faiss_index.d}, "
                             f"the manifest says {count} x {dim}")
    _set_search_params(faiss_index, config)
    return faiss_index
