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
folder. Parts are ONNX graphs, tokenizer files, TensorRT plans and the like.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
import warnings
from dataclasses import dataclass
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


@dataclass(frozen=True)
class EngineFile:
    """A verified, read-only view of an engine file (all parts are read into memory).

    Use `EngineFile.read(path)`; `manifest` is the parsed JSON, `part(name)` the bytes of a part.
    """

    path: Path
    manifest: dict
    _parts: dict

    @classmethod
    def read(cls, path: str | os.PathLike) -> "EngineFile":
        """Read and verify an engine file.

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
        if len(raw) < _HEADER.size:
            raise EngineError(f"{path}: not a moon3 engine (only {len(raw)} bytes, truncated?)")
        magic, version, n, digest = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise EngineError(f"{path}: not a moon3 engine file (bad magic {magic!r})")
        if version != FORMAT_VERSION:
            raise EngineError(
                f"{path}: engine format version {version} is not supported by this sdk (reads version "
                f"{FORMAT_VERSION}); rebuild the engine with this sdk or install the matching sdk"
            )
        if n > MAX_MANIFEST_BYTES or _HEADER.size + n > len(raw):
            raise EngineError(f"{path}: manifest length {n} exceeds the file size; the file is truncated or corrupt")
        body = raw[_HEADER.size : _HEADER.size + n]
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
            index = manifest["parts"]
            if not isinstance(index, list):
                raise TypeError("parts is not a list")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise EngineError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc
        if manifest.get("format_version", version) != version:
            raise EngineError(
                f"{path}: the manifest says format version {str(manifest['format_version'])[:20]}, the header "
                f"{version}; the file was modified or corrupted"
            )
        data_start = _HEADER.size + n
        parts = {}
        end = 0
        for entry in index:
            try:
                name, off, size, sha = entry["name"], entry["offset"], entry["size"], entry["sha256"]
                if type(off) is not int or type(size) is not int or not isinstance(sha, str):
                    raise TypeError("offset and size must be integers, sha256 a string")
            except (KeyError, TypeError, IndexError) as exc:
                raise EngineError(f"{path}: malformed part entry {str(entry)[:200]} ({exc})") from exc
            _check_name(name, f"{path}: ")
            if name in parts:
                raise EngineError(f"{path}: part {name!r} is listed twice in the manifest")
            lo, hi = data_start + off, data_start + off + size
            if off < 0 or size < 0 or hi > len(raw):
                raise EngineError(f"{path}: part {name!r} extends past the end of the file; the file is truncated")
            blob = raw[lo:hi]
            if hashlib.sha256(blob).hexdigest() != sha:
                raise EngineError(f"{path}: checksum mismatch in part {name!r}; the file was modified or corrupted")
            parts[name] = blob
            end = max(end, off + size)
        if data_start + end != len(raw):
            raise EngineError(
                f"{path}: {len(raw) - data_start - end} bytes after the last part; the file was modified or corrupted"
            )
        _warn_if_newer(path, manifest)
        return cls(path=path, manifest=manifest, _parts=parts)

    @property
    def part_names(self) -> list[str]:
        return list(self._parts)

    def part(self, name: str) -> bytes:
        """Bytes of a part.

        Raises:
            EngineError: the engine has no part of that name (the message lists those it has).
        """
        try:
            return self._parts[name]
        except KeyError:
            raise EngineError(f"{self.path}: engine has no part {name!r}; it has {sorted(self._parts)}") from None


def _version_tuple(v: str) -> tuple[int, ...]:
    # At most 9 digits per field: int() refuses very long digit strings (ValueError).
    return tuple(int(m) for m in re.findall(r"\d{1,9}", str(v).split("+")[0])[:3])


def _warn_if_newer(path: Path, manifest: dict) -> None:
    """An engine written by a newer sdk may use manifest fields this one ignores: say so."""
    from sdk import __version__

    versions = manifest.get("versions")
    built = versions.get("moon3-sdk") if isinstance(versions, dict) else None
    if built and _version_tuple(built) > _version_tuple(__version__):
        warnings.warn(
            f"{path} was built by moon3-sdk {str(built)[:40]}, newer than this {__version__}; "
            "upgrade moon3-sdk if anything looks wrong",
            UserWarning,
            stacklevel=3,
        )
