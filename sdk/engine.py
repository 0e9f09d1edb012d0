"""The `moon3.engine` bundle: one file holding a JSON manifest and named binary parts.

Layout (all integers little-endian)::

    magic      8 bytes   b"MOON3ENG"
    version    u32       FORMAT_VERSION
    n_manifest u64       length of the manifest JSON in bytes
    digest     32 bytes  SHA-256 of the manifest JSON
    manifest   n_manifest bytes of UTF-8 JSON; manifest["parts"] lists every part as
               {"name", "offset", "size", "sha256"}, offsets relative to the end of the manifest
    parts      the part bytes, back to back

Reading never executes anything from the file (JSON and raw bytes only), checks every digest, and
refuses unknown versions, truncation, tampering and part names that look like paths out of a
folder. Parts are ONNX graphs, tokenizer files, TensorRT plans and the like. `EngineFile.open`
checks a part's digest when the part is first read, so a runtime reads only the parts it uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

from sdk.errors import EngineError

MAGIC = b"MOON3ENG"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}){0,3}$")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def _check_name(name: str, where: str = "") -> None:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name.split("/"):
        raise EngineError(f"{where}invalid part name {name!r}: use letters, digits, '_', '-', '.' and at most 3 '/'")


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def write_engine(path: str | os.PathLike, manifest: Mapping[str, Any], parts: Mapping[str, bytes]) -> Path:
    """Write an engine file atomically (a new temporary file beside it, then rename).

    Nothing outside `path` is written: the temporary file is created exclusively (an existing file
    or symlink of that name is never opened), and the rename replaces `path` itself, so a symlink
    at `path` is replaced, not followed.

    Args:
        path: output file.
        manifest: JSON-serialisable metadata; its "parts" key is written by this function.
        parts: part name -> bytes.

    Returns:
        The path written.

    Raises:
        EngineError: a part name is invalid or the manifest is not JSON-serialisable.
    """
    path = Path(path)
    index, offset = [], 0
    for name, data in parts.items():
        _check_name(name)
        data = bytes(data)
        index.append({"name": name, "offset": offset, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        offset += len(data)
    try:
        body = json.dumps({**manifest, "parts": index}, sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise EngineError(f"manifest is not JSON-serialisable: {exc}") from exc
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        with os.fdopen(os.open(tmp, flags, 0o666), "wb") as f:
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest()))
            f.write(body)
            for data in parts.values():
                f.write(bytes(data))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class EngineFile:
    """A verified, read-only view of an engine file.

    `EngineFile.read(path)` reads every part into memory and verifies every checksum at once;
    `EngineFile.open(path)` verifies the header, the manifest digest and the part table (every part
    lies inside the file, nothing after the last one) and reads a part, verifying its checksum,
    only when `part(name)` asks for it. The runtime opens engines lazily, so an embedder never
    reads (or pays for) the reasoner's graphs; no part's bytes are ever returned unverified.

    `manifest` is the parsed JSON, `part(name)` the bytes of a part, `digest` the SHA-256 of the
    manifest (which lists every part's checksum, so it identifies the whole file). An opened file
    keeps its descriptor until `close()` (or the end of a `with` block, or garbage collection):
    parts are read from the file that was verified at open even if the path is replaced meanwhile.
    Parts are read with `pread`, not memory-mapped: ONNX Runtime takes a graph as `bytes` (a copy
    either way), and a mapping of a file truncated while in use faults (SIGBUS) where a read
    returns short and is refused with `EngineError`.
    """

    def __init__(self, path: Path, manifest: dict, index: dict[str, tuple[int, int, str]], digest: str,
                 fd: int | None = None, parts: dict[str, bytes] | None = None):
        self.path = path
        self.manifest = manifest
        self.digest = digest
        self._index = index  # name -> (absolute offset, size, sha256 hex)
        self._parts: dict[str, bytes] = dict(parts or {})
        self._fd = fd
        self._lock = threading.Lock()  # seek + read where there is no pread
        self._finalizer = weakref.finalize(self, os.close, fd) if fd is not None else None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "EngineFile":
        """Open an engine file, verifying its header, manifest digest and part table.

        Part checksums are verified when a part is read (`part`); `verify()` checks them all.

        Raises:
            EngineError: missing file, wrong magic, unsupported version, truncated content, a
                tampered manifest, or a malformed manifest; the message says which.
        """
        path = Path(path)
        try:
            if not path.is_file():
                raise EngineError(f"engine file not found: {path}")
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except (OSError, ValueError) as exc:  # permission denied, name too long, NUL in the path
            raise EngineError(f"cannot read engine file {str(path)[:200]!r}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            head = _pread(fd, _HEADER.size, 0)
            manifest, index, digest = _parse(path, size, head, lambda n: _pread(fd, n, _HEADER.size))
        except OSError as exc:
            os.close(fd)
            raise EngineError(f"cannot read engine file {str(path)[:200]!r}: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        engine = cls(path, manifest, index, digest, fd=fd)
        try:
            _warn_if_newer(path, manifest)  # may raise where warnings are errors
        except BaseException:
            engine.close()
            raise
        return engine

    @classmethod
    def read(cls, path: str | os.PathLike) -> "EngineFile":
        """Read an engine file into memory and verify every checksum.

        Raises:
            EngineError: missing file, wrong magic, unsupported version, truncated or tampered
                content, or a malformed manifest; the message says which.
        """
        path = Path(path)
        try:
            if not path.is_file():
                raise EngineError(f"engine file not found: {path}")
            raw = path.read_bytes()
        except (OSError, ValueError) as exc:  # permission denied, name too long, NUL in the path
            raise EngineError(f"cannot read engine file {str(path)[:200]!r}: {exc}") from exc
        view = memoryview(raw)
        manifest, index, digest = _parse(path, len(raw), raw[: _HEADER.size],
                                         lambda n: raw[_HEADER.size : _HEADER.size + n])
        parts = {name: _verified(path, name, sha, view[lo : lo + size]) for name, (lo, size, sha) in index.items()}
        _warn_if_newer(path, manifest)
        return cls(path, manifest, index, digest, parts=parts)

    @property
    def part_names(self) -> list[str]:
        return list(self._index)

    def part_size(self, name: str) -> int:
        """Size in bytes of a part (from the verified manifest; nothing is read)."""
        return self._entry(name)[1]

    def part(self, name: str) -> bytes:
        """Bytes of a part, verified against the manifest's checksum.

        Raises:
            EngineError: the engine has no part of that name (the message lists those it has),
                or its bytes do not match their checksum (tampered, or truncated since the open).
        """
        cached = self._parts.get(name)
        if cached is not None:
            return cached
        off, size, sha = self._entry(name)
        if self._fd is None or not self._finalizer.alive:
            raise EngineError(f"{self.path}: the engine file was closed; open it again to read part {name!r}")
        try:
            if hasattr(os, "pread"):
                blob = _pread(self._fd, size, off)
            else:
                with self._lock:
                    os.lseek(self._fd, off, os.SEEK_SET)
                    blob = _read_all(self._fd, size)
        except OSError as exc:
            raise EngineError(f"{self.path}: cannot read part {name!r}: {exc}") from exc
        if len(blob) != size:
            raise EngineError(f"{self.path}: part {name!r} extends past the end of the file; the file is truncated")
        return _verified(self.path, name, sha, blob)

    def verify(self) -> None:
        """Read every part and verify its checksum (what `read` does at once).

        Raises:
            EngineError: a part does not match its checksum.
        """
        for name in self._index:
            self.part(name)

    def close(self) -> None:
        """Release the file descriptor of an opened engine (parts already read stay valid)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "EngineFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entry(self, name: str) -> tuple[int, int, str]:
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise EngineError(f"{self.path}: engine has no part {name!r}; it has {sorted(self._index)}") from None


def _read_all(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        b = os.read(fd, min(left, 1 << 30))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def _pread(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset` (fewer only at the end of the file)."""
    if not hasattr(os, "pread"):
        os.lseek(fd, offset, os.SEEK_SET)
        return _read_all(fd, n)
    chunks, got = [], 0
    while got < n:
        # Linux returns at most ~2 GiB per call
        b = os.pread(fd, min(n - got, 1 << 30), offset + got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _verified(path: Path, name: str, sha: str, blob) -> bytes:
    if hashlib.sha256(blob).hexdigest() != sha:
        raise EngineError(f"{path}: checksum mismatch in part {name!r}; the file was modified or corrupted")
    return bytes(blob)


def _parse(path: Path, size: int, head: bytes, read_manifest) -> tuple[dict, dict[str, tuple[int, int, str]], str]:
    """Header, manifest and part table of a file of `size` bytes -> (manifest, index, digest).

    `read_manifest(n)` gives the n bytes after the header. Every part must lie inside the file and
    the last one must end where the file does; the parts' checksums are not checked here."""
    if size < _HEADER.size or len(head) < _HEADER.size:
        raise EngineError(f"{path}: not a moon3 engine (only {size} bytes, truncated?)")
    magic, version, n, digest = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise EngineError(f"{path}: not a moon3 engine file (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise EngineError(
            f"{path}: engine format version {version} is not supported by this sdk (reads version "
            f"{FORMAT_VERSION}); rebuild the engine with this sdk or install the matching sdk"
        )
    if n > MAX_MANIFEST_BYTES or _HEADER.size + n > size:
        raise EngineError(f"{path}: manifest length {n} exceeds the file size; the file is truncated or corrupt")
    body = read_manifest(n)
    if len(body) != n:
        raise EngineError(f"{path}: manifest length {n} exceeds the file size; the file is truncated or corrupt")
    if hashlib.sha256(body).digest() != digest:
        raise EngineError(f"{path}: manifest checksum mismatch; the file was modified or corrupted")
    try:
        # Strict JSON: NaN/Infinity (which the writer never emits) are refused; nesting too
        # deep for the parser is a RecursionError.
        manifest = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
        if not isinstance(manifest, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
                type(manifest), "a number")
            raise TypeError(f"the manifest is {kind}, not a JSON object")
        entries = manifest["parts"]
        if not isinstance(entries, list):
            raise TypeError("parts is not a list")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise EngineError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc
    if manifest.get("format_version", version) != version:
        raise EngineError(
            f"{path}: the manifest says format version {str(manifest['format_version'])[:20]}, the header "
            f"{version}; the file was modified or corrupted"
        )
    data_start = _HEADER.size + n
    index: dict[str, tuple[int, int, str]] = {}
    end = 0
    for entry in entries:
        try:
            name, off, psize, sha = entry["name"], entry["offset"], entry["size"], entry["sha256"]
            if type(off) is not int or type(psize) is not int or not isinstance(sha, str):
                raise TypeError("offset and size must be integers, sha256 a string")
        except (KeyError, TypeError, IndexError) as exc:
            raise EngineError(f"{path}: malformed part entry {str(entry)[:200]} ({exc})") from exc
        _check_name(name, f"{path}: ")
        if name in index:
            raise EngineError(f"{path}: part {name!r} is listed twice in the manifest")
        lo, hi = data_start + off, data_start + off + psize
        if off < 0 or psize < 0 or hi > size:
            raise EngineError(f"{path}: part {name!r} extends past the end of the file; the file is truncated")
        index[name] = (lo, psize, sha)
        end = max(end, off + psize)
    if data_start + end != size:
        raise EngineError(
            f"{path}: {size - data_start - end} bytes after the last part; the file was modified or corrupted"
        )
    return manifest, index, digest.hex()


def _version_tuple(v: str) -> tuple[int, ...]:
    # At most 9 digits per field: int() refuses very long digit strings (ValueError).
    return tuple(int(m) for m in re.findall(r"\d{1,9}", str(v).split("+")[0])[:3])


def _warn_if_newer(path: Path, manifest: dict) -> None:
    """An engine written by a newer sdk may use manifest fields this one ignores: say so."""
    from sdk.version import __version__

    versions = manifest.get("versions")
    built = versions.get("moon3-sdk") if isinstance(versions, dict) else None
    if built and _version_tuple(built) > _version_tuple(__version__):
        warnings.warn(
            f"{path} was built by moon3-sdk {str(built)[:40]}, newer than this {__version__}; "
            "upgrade moon3-sdk if anything looks wrong",
            UserWarning,
            stacklevel=3,
        )
