"""How much of a file sits in the OS page cache, and evicting it: cold-start benchmarks that are
really cold.

    from sdk.pagecache import cached_fraction, evict
    evict("moon3.engine")             # posix_fadvise(POSIX_FADV_DONTNEED) over the whole file
    cached_fraction("moon3.engine")   # 0.0 .. 1.0 of its pages resident (mincore), None if unknown

A fresh copy of a file is not cold: writing it leaves its pages in the cache. `evict` asks the
kernel to drop the file's clean pages; pages another process has mapped and locked stay, so
`cached_fraction` afterwards says what the next read will find. Only the named file is evicted:
the interpreter, onnxruntime's shared library and the Python packages stay cached, as on a
server that restarts its model process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

__all__ = ["cached_fraction", "evict"]


def evict(path: str | os.PathLike) -> None:
    """Drop `path`'s pages from the page cache (written-back first; no-op where unsupported).

    Raises:
        FileNotFoundError: no such file.
    """
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        try:
            os.fsync(fd)  # dirty pages are not dropped: write them back first
        except OSError:
            pass
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _libc():
    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "posix_fadvise"):  # Linux (glibc/musl) only
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    if not all(hasattr(libc, f) for f in ("mmap", "munmap", "mincore")):
        return None
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    return libc


def cached_fraction(path: str | os.PathLike) -> float | None:
    """The fraction of `path`'s pages resident in the page cache (mincore over a read-only shared
    map, which reads nothing), 1.0 for an empty file; None where that is not available.

    Raises:
        FileNotFoundError: no such file.
    """
    size = Path(path).stat().st_size
    if size == 0:
        return 1.0
    libc = _libc()
    if libc is None:
        return None
    n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * n)()
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            if libc.mincore(addr, size, vec) != 0:
                return None
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / n
