"""Catalog-scale batch embedding that can be killed and restarted: every item comes out exactly once.

    from sdk.batch import CatalogJob, run_local
    summary = run_local(CatalogJob(input="items.jsonl", out="vectors/", engine="moon3.engine"))

This module is the runner-agnostic part; `sdk.ray.run_ray` runs the same shards on a Ray cluster.

The input is a catalog file, JSONL (one product per line, the `items.jsonl` format) or Parquet, with
an `id` (int or str, unique) and the fields `Embedder.embed_products` reads: `title`, optional
`image` (a path, relative to `root`, default the catalog's folder) and optional `trace`; other
fields (description, brand, ...) are ignored. The output folder holds:

    job.json                      what the job is: input fingerprint, shard size, engine, dim;
                                  a restart with anything different is refused
    vectors/part-00012.parquet    (id, vector float32[dim]) of the good items of input shard 12
    errors/part-00012.jsonl       {"id": ..., "error": "..."} per bad item of shard 12 (may be empty)
    errors.jsonl, summary.json    all bad items, and the counts; written when every shard is done

Exactness. Input shard k is rows [k*S, (k+1)*S) of the catalog in file order, so the split is the
same on every run. A shard's errors file and then its vectors file are each written to a
temporary name and renamed into place (atomic on one file system); the vectors file is the
shard's commit mark. On a (re)start, a shard counts as done only if its vectors file exists and
verifies: the ids in its vectors and errors files are exactly the ids of the input shard and the
vectors have the job's width. Anything else (no file, a partial temporary file, a file from a
killed writer that fails verification) is embedded again; the rename replaces it whole. A shard
embedded twice (a retried Ray task) writes the same name twice, never two copies. So after a
finished run every input id is in exactly one of vectors/ and errors/, once.

Bad items (corrupt or missing image, empty text) never fail their shard: `Embedder.embed_products`
with errors="report" embeds the good ones and the bad ones go to errors/.

Needs pyarrow (`pip install 'moon3-sdk[ray]'`); never imports torch or Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdk.errors import BatchError, InvalidInputError, SdkError, TruncationWarning
from sdk.paths import file_sha256

__all__ = ["CatalogJob", "JobSummary", "Plan", "Shard", "ShardEmbedder", "finalize", "plan", "read_vectors",
           "run_local"]

FORMAT = 1  # of job.json and the shard files


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - registers pyarrow.parquet
    except ImportError as exc:
        raise ImportError(f"batch embedding needs pyarrow ({exc}): pip install 'moon3-sdk[ray]'") from exc
    return pyarrow


@dataclass(frozen=True)
class CatalogJob:
    """One batch-embedding job.

    Args:
        input: the catalog, `.jsonl` or `.parquet`.
        out: output folder (created); one folder holds one job.
        engine: the `moon3.engine` file.
        root: folder image paths are relative to; None = the catalog's folder.
        shard_size: items per input shard, the unit of work, of retry and of output files.
        dim: output width (a Matryoshka prefix) or None for the engine's full width.
        batch_size: items per ONNX Runtime call inside a shard.

    Raises:
        ValueError: a bad shard_size, batch_size or dim, or an input that is neither JSONL nor Parquet.
    """

    input: Path
    out: Path
    engine: Path
    root: Path | None = None
    shard_size: int = 1024
    dim: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("input", "out", "engine", "root"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, Path(v))
        if self.input.suffix.lower() not in (".jsonl", ".parquet"):
            raise ValueError(f"input must be a .jsonl or .parquet catalog, got {str(self.input)!r}")
        for name in ("shard_size", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {self.dim!r}")

    @property
    def image_root(self) -> Path:
        return self.root if self.root is not None else self.input.parent

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CatalogJob":
        return cls(**d)


@dataclass(frozen=True)
class Shard:
    """Input rows [start, stop); for JSONL also the byte range [offset, offset + length)."""

    index: int
    start: int
    stop: int
    offset: int
    length: int
    ids_digest: str  # sha256 of the shard's sorted ids: what its outputs must hold

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


@dataclass
class Plan:
    job: CatalogJob
    items: int
    id_type: str  # "int64" or "string"
    dim: int
    shards: list[Shard]
    done: list[int] = field(default_factory=list)  # shard indices whose outputs verified

    @property
    def pending(self) -> list[Shard]:
        have = set(self.done)
        return [s for s in self.shards if s.index not in have]


@dataclass(frozen=True)
class JobSummary:
    items: int
    embedded: int
    bad: int
    shards: int
    shards_run: int  # embedded by this run (the others were done before)
    seconds: float
    out: Path

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ---------------------------------------------------------------------------------------------- planning


def _check_id(value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value):
        raise InvalidInputError(f"{where}: 'id' must be a non-empty str or an int, got {value!r}")
    return value


def _ids_digest(ids: list[Any]) -> str:
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()


def _scan_jsonl(path: Path, shard_size: int) -> tuple[str, list[Any], list[tuple[int, int, int, int]]]:
    """One pass: sha256 of the file, the ids in order, and per shard (start, stop, offset, length)."""
    h = hashlib.sha256()
    ids: list[Any] = []
    bounds: list[tuple[int, int, int, int]] = []
    shard_offset, pos = 0, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            h.update(line)
            if line.strip():
                if len(ids) % shard_size == 0 and ids:
                    bounds.append((len(ids) - shard_size, len(ids), shard_offset, pos - shard_offset))
                    shard_offset = pos
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InvalidInputError(f"{path}:{lineno}: not valid JSON ({exc})") from None
                if not isinstance(rec, dict) or "id" not in rec:
                    raise InvalidInputError(f"{path}:{lineno}: a product must be a JSON object with an 'id'")
                ids.append(_check_id(rec["id"], f"{path}:{lineno}"))
            pos += len(line)
    if ids:
        start = (len(ids) - 1) // shard_size * shard_size
        bounds.append((start, len(ids), shard_offset, pos - shard_offset))
    return h.hexdigest(), ids, bounds


def _scan_parquet(path: Path, shard_size: int) -> tuple[str, list[Any], list[tuple[int, int, int, int]]]:
    pa = _pyarrow()
    try:
        table = pa.parquet.read_table(path, columns=["id"])
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise InvalidInputError(f"{path}: cannot read an 'id' column ({exc})") from exc
    ids = table.column("id").to_pylist()
    for row, v in enumerate(ids):
        _check_id(v, f"{path} row {row}")
    bounds = [(s, min(s + shard_size, len(ids)), 0, 0) for s in range(0, len(ids), shard_size)]
    return file_sha256(path), ids, bounds


def _engine_identity(engine: Path) -> tuple[str, int]:
    """(sha256 identifying the engine, its full width). The manifest lists every part's sha256 and
    its own digest is verified when the file is opened, so hashing the manifest identifies the whole
    file without reading the parts (each is verified where it is loaded, by the workers)."""
    from sdk.engine import EngineFile
    from sdk.errors import EngineError

    with EngineFile.open(engine) as e:
        m = e.manifest
    try:
        dim = int(m["embedder"]["dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"{engine}: the manifest has no usable embedder section ({exc})") from exc
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest(), dim


def plan(job: CatalogJob, *, overwrite: bool = False) -> Plan:
    """Split the catalog into shards, write or check `job.json`, and find the shards already done.

    Args:
        job: the job.
        overwrite: start over in an output folder that holds another job's files (they are removed).

    Returns:
        The `Plan`: every shard, and which verified as done.

    Raises:
        InvalidInputError: the catalog is missing, unreadable, has a record without a valid id,
            duplicate ids, or mixes int and str ids.
        SdkError: the output folder holds another job (other input, shard size, engine or dim)
            and overwrite is False.
        EngineError: the engine file is unusable.
    """
    if not job.input.is_file():
        raise InvalidInputError(f"catalog not found: {job.input}")
    scan = _scan_jsonl if job.input.suffix.lower() == ".jsonl" else _scan_parquet
    input_sha, ids, bounds = scan(job.input, job.shard_size)
    types = {type(i) for i in ids}
    if len(types) > 1:
        raise InvalidInputError(f"{job.input}: ids mix ints and strings; use one type for every product")
    if len(set(ids)) != len(ids):
        seen: set[Any] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise InvalidInputError(f"{job.input}: duplicate id {dup!r}; ids must be unique to be embedded exactly once")
    id_type = "string" if types == {str} else "int64"
    engine_sha, full_dim = _engine_identity(job.engine)
    dim = full_dim if job.dim is None else job.dim
    if dim > full_dim:
        raise ValueError(f"dim {dim} is wider than the engine's {full_dim}")
    shards = [Shard(k, a, b, off, n, _ids_digest(ids[a:b])) for k, (a, b, off, n) in enumerate(bounds)]

    identity = {
        "format": FORMAT, "input": str(job.input.resolve()), "input_sha256": input_sha, "items": len(ids),
        "id_type": id_type, "shard_size": job.shard_size, "shards": len(shards), "engine_manifest_sha256": engine_sha,
        "dim": dim, "image_root": str(job.image_root.resolve()),
    }
    out = job.out
    meta = out / "job.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        differs = sorted(k for k in identity if old.get(k) != identity[k])
        if differs and not overwrite:
            raise SdkError(
                f"{out} holds another job (it differs in {', '.join(differs)}); use a new output folder or "
                "overwrite=True (--overwrite) to start over"
            )
        if differs:
            _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("vectors", "errors"):
        (out / sub).mkdir(exist_ok=True)
        for tmp in (out / sub).glob("*.tmp-*"):  # left by a killed writer
            tmp.unlink(missing_ok=True)
    _atomic_write(meta, json.dumps(identity, indent=1).encode())

    p = Plan(job, len(ids), id_type, dim, shards)
    p.done = [s.index for s in shards if verify_shard(p, s)]
    return p


def _clear(out: Path) -> None:
    for sub in ("vectors", "errors"):
        for f in (out / sub).glob("part-*"):
            f.unlink()
    for name in ("errors.jsonl", "summary.json", "job.json"):
        (out / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- shard files


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename into place."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def vectors_path(out: Path, shard: Shard) -> Path:
    return out / "vectors" / f"{shard.name}.parquet"


def errors_path(out: Path, shard: Shard) -> Path:
    return out / "errors" / f"{shard.name}.jsonl"


def _read_errors(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def verify_shard(p: Plan, shard: Shard) -> bool:
    """True if the shard's outputs exist and hold exactly its ids at the job's width."""
    pa = _pyarrow()
    vpath, epath = vectors_path(p.job.out, shard), errors_path(p.job.out, shard)
    if not (vpath.is_file() and epath.is_file()):
        return False
    try:
        table = pa.parquet.read_table(vpath, columns=["id", "vector"])
        vtype = table.schema.field("vector").type
        if not (pa.types.is_fixed_size_list(vtype) and vtype.list_size == p.dim):
            return False
        ids = table.column("id").to_pylist() + [e["id"] for e in _read_errors(epath)]
    except (pa.ArrowException, OSError, KeyError, ValueError, TypeError):
        return False
    return len(ids) == shard.stop - shard.start and _ids_digest(ids) == shard.ids_digest


def read_shard(job: CatalogJob, shard: Shard) -> list[dict[str, Any]]:
    """The catalog records of one shard, in file order."""
    if job.input.suffix.lower() == ".jsonl":
        with open(job.input, "rb") as f:
            f.seek(shard.offset)
            data = f.read(shard.length)
        recs = [json.loads(line) for line in data.split(b"\n") if line.strip()]  # as the scan splits
    else:
        pa = _pyarrow()
        pf = pa.parquet.ParquetFile(job.input)
        # Only the row groups that overlap [start, stop).
        groups, first, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row < shard.stop and row + n > shard.start:
                groups.append(g)
                first = row if first is None else first
            row += n
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
        recs = table.slice(shard.start - (first or 0), shard.stop - shard.start).to_pylist()
    if len(recs) != shard.stop - shard.start:
        raise SdkError(f"{job.input}: shard {shard.index} has {len(recs)} records, planned {shard.stop - shard.start}; "
                       "was the catalog changed during the job?")
    return recs


class ShardEmbedder:
    """Embeds whole shards and writes their files; loads the engine once (one per worker).

    Args:
        job: the job.
        dim: the plan's output width.
        id_type: the plan's id type ("int64" or "string").
        providers, threads: as in `sdk.Embedder`.
    """

    def __init__(self, job: CatalogJob, dim: int, id_type: str, providers: Any = None, threads: int | None = None):
        from sdk.embedder import Embedder

        self.job, self.dim, self.id_type = job, dim, id_type
        self.embedder = Embedder(job.engine, providers=providers, threads=threads)

    def __call__(self, shard: Shard) -> dict[str, int]:
        """Embed one shard and commit its files; returns {"index", "items", "embedded", "bad", "pid"}."""
        pa = _pyarrow()
        recs = read_shard(self.job, shard)
        ids = [r["id"] for r in recs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)  # truncation is not an error
            try:
                vecs = self.embedder.embed_products(recs, root=self.job.image_root, dim=self.dim,
                                                    batch_size=self.job.batch_size)
                errors: dict[int, str] = {}
            except BatchError as exc:
                vecs, errors = exc.vectors, exc.errors
        good = [i for i in range(len(recs)) if i not in errors]
        vecs = np.ascontiguousarray(vecs[good], dtype=np.float32)  # (G, dim)
        lines = []
        for i in sorted(errors):
            msg = errors[i]
            prefix = f"record {i}: "
            lines.append(json.dumps({"id": ids[i], "error": msg[len(prefix):] if msg.startswith(prefix) else msg}))
        _atomic_write(errors_path(self.job.out, shard), "".join(line + "\n" for line in lines).encode())
        id_arr = pa.array([ids[i] for i in good], type=pa.int64() if self.id_type == "int64" else pa.string())
        vec_arr = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), type=pa.float32()), self.dim)
        table = pa.table({"id": id_arr, "vector": vec_arr})
        sink = pa.BufferOutputStream()
        pa.parquet.write_table(table, sink)
        _atomic_write(vectors_path(self.job.out, shard), sink.getvalue().to_pybytes())  # the commit mark
        return {"index": shard.index, "items": len(recs), "embedded": len(good), "bad": len(errors), "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------- finishing


def finalize(p: Plan, *, shards_run: int = 0, seconds: float = 0.0) -> JobSummary:
    """Verify every shard, then write errors.jsonl and summary.json.

    Raises:
        SdkError: a shard is missing or fails verification (the job is not finished).
    """
    bad_shards = [s.index for s in p.shards if not verify_shard(p, s)]
    if bad_shards:
        raise SdkError(f"{len(bad_shards)} shard(s) are not done or failed verification: {bad_shards[:10]}; "
                       "run the job again to finish them")
    errors: list[str] = []
    for s in p.shards:
        errors.extend(line for line in errors_path(p.job.out, s).read_text(encoding="utf-8").splitlines() if line)
    _atomic_write(p.job.out / "errors.jsonl", "".join(e + "\n" for e in errors).encode())
    summary = JobSummary(p.items, p.items - len(errors), len(errors), len(p.shards), shards_run, round(seconds, 3),
                         p.job.out)
    _atomic_write(p.job.out / "summary.json", json.dumps(summary.to_dict(), indent=1).encode())
    return summary


def read_vectors(out: str | os.PathLike) -> tuple[list[Any], np.ndarray]:
    """All (ids, vectors (N, dim) float32) of a job's output folder, in shard order."""
    pa = _pyarrow()
    files = sorted((Path(out) / "vectors").glob("part-*.parquet"))
    if not files:
        return [], np.zeros((0, 0), np.float32)
    table = pa.concat_tables([pa.parquet.read_table(f) for f in files])
    ids = table.column("id").to_pylist()
    col = table.column("vector").combine_chunks()
    width = col.type.list_size
    return ids, col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32, copy=False)


def run_local(
    job: CatalogJob,
    *,
    providers: Any = None,
    threads: int | None = None,
    overwrite: bool = False,
    on_shard: Callable[[dict[str, int]], None] | None = None,
) -> JobSummary:
    """Run a job in this process (no Ray): plan, embed the pending shards, finalize.

    Args:
        job: the job.
        providers, threads: as in `sdk.Embedder`.
        overwrite: as in `plan`.
        on_shard: called after each shard is committed with its counts (progress, tests).

    Returns:
        The `JobSummary` (also written to summary.json).
    """
    t0 = time.perf_counter()
    p = plan(job, overwrite=overwrite)
    pending = p.pending
    if pending:
        worker = ShardEmbedder(job, p.dim, p.id_type, providers=providers, threads=threads)
        for shard in pending:
            counts = worker(shard)
            if on_shard is not None:
                on_shard(counts)
    return finalize(p, shards_run=len(pending), seconds=time.perf_counter() - t0)
