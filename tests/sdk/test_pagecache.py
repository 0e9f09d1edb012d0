"""`sdk.pagecache`: page-cache residency (mincore) and eviction (posix_fadvise) of one file."""

import os

import pytest

from sdk.pagecache import cached_fraction, evict


def test_a_file_just_read_is_cached_and_eviction_empties_it(tmp_path):
    path = tmp_path / "engine.bin"
    path.write_bytes(os.urandom(1 << 20))
    path.read_bytes()
    before = cached_fraction(path)
    if before is None:
        pytest.skip("mincore is not available on this platform")
    assert before == 1.0
    evict(path)
    after = cached_fraction(path)
    if after == 1.0:
        pytest.skip(f"this file system keeps the pages ({tmp_path} is memory-backed): nothing to evict")
    assert after < 0.1
    path.read_bytes()
    assert cached_fraction(path) == 1.0


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert cached_fraction(empty) == 1.0
    evict(empty)
    with pytest.raises(FileNotFoundError):
        cached_fraction(tmp_path / "none")
    with pytest.raises(FileNotFoundError):
        evict(tmp_path / "none")
