"""The engine file: round trip, and refusal of every kind of damage with a clear message."""

import hashlib
import json
import os
import struct

import pytest

from sdk.engine import FORMAT_VERSION, MAGIC, EngineFile, write_engine
from sdk.errors import EngineError

PARTS = {"embedder.onnx": b"\x08\x01graph-bytes" * 50, "tokenizer.json": b'{"model": {}}', "plans/sm90.plan": b""}


@pytest.fixture()
def engine(tmp_path):
    return write_engine(tmp_path / "m.engine", {"format": "moon3", "dims": {"embedding": 256}}, PARTS)


def test_round_trip(engine):
    e = EngineFile.read(engine)
    assert e.manifest["dims"] == {"embedding": 256}
    assert e.part_names == list(PARTS)
    for name, data in PARTS.items():
        assert e.part(name) == data
    with pytest.raises(EngineError, match="no part 'x.onnx'"):
        e.part("x.onnx")


def test_missing_and_tiny_files(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        EngineFile.read(tmp_path / "none.engine")
    (tmp_path / "t").write_bytes(b"MOON")
    with pytest.raises(EngineError, match="truncated"):
        EngineFile.read(tmp_path / "t")


def test_bad_magic(engine):
    raw = bytearray(engine.read_bytes())
    raw[0:8] = b"PK\x03\x04abcd"
    engine.write_bytes(bytes(raw))
    with pytest.raises(EngineError, match="bad magic"):
        EngineFile.read(engine)


def test_unknown_version(engine):
    raw = bytearray(engine.read_bytes())
    raw[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    engine.write_bytes(bytes(raw))
    with pytest.raises(EngineError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        EngineFile.read(engine)


@pytest.mark.parametrize("cut", [1, 100, 400])
def test_truncated(engine, cut):
    raw = engine.read_bytes()
    engine.write_bytes(raw[:-cut])
    with pytest.raises(EngineError, match="truncated"):
        EngineFile.read(engine)


def test_flipped_byte_in_a_part(engine):
    raw = bytearray(engine.read_bytes())
    raw[-20] ^= 0xFF
    engine.write_bytes(bytes(raw))
    with pytest.raises(EngineError, match="checksum mismatch in part 'embedder.onnx'"):
        EngineFile.read(engine)


def test_edited_manifest(engine):
    raw = engine.read_bytes()
    edited = raw.replace(b'"embedding": 256', b'"embedding": 512')
    assert edited != raw
    engine.write_bytes(edited)
    with pytest.raises(EngineError, match="manifest checksum mismatch"):
        EngineFile.read(engine)


def test_swapped_manifest_with_valid_digest_is_still_checked(engine):
    """A forged manifest with a recomputed digest cannot point parts at other bytes unnoticed."""
    raw = engine.read_bytes()
    n = struct.unpack_from("<Q", raw, 12)[0]
    man = json.loads(raw[52 : 52 + n])
    man["parts"][0]["offset"] += 1
    body = json.dumps(man).encode()
    forged = struct.pack("<8sIQ32s", MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest()) + body + raw[52 + n :]
    engine.write_bytes(forged)
    with pytest.raises(EngineError, match="checksum mismatch in part"):
        EngineFile.read(engine)


@pytest.mark.parametrize("name", ["../evil", "/abs/path", "a/../../b", "", "x" * 300, "a\\b", ".hidden"])
def test_path_tricks_in_part_names_are_refused(tmp_path, name):
    with pytest.raises(EngineError, match="invalid part name"):
        write_engine(tmp_path / "e", {}, {name: b"x"})


def test_forged_path_name_is_refused_on_read(engine):
    raw = engine.read_bytes()
    n = struct.unpack_from("<Q", raw, 12)[0]
    man = json.loads(raw[52 : 52 + n])
    man["parts"][1]["name"] = "../../etc/passwd"
    body = json.dumps(man).encode()
    header = struct.pack("<8sIQ32s", MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest())
    engine.write_bytes(header + body + raw[52 + n :])
    with pytest.raises(EngineError, match="invalid part name"):
        EngineFile.read(engine)


def test_manifest_must_be_json(tmp_path):
    with pytest.raises(EngineError, match="not JSON-serialisable"):
        write_engine(tmp_path / "e", {"x": object()}, {})
    with pytest.raises(EngineError, match="not JSON-serialisable"):
        write_engine(tmp_path / "e", {"x": float("nan")}, {})


def test_write_is_atomic(tmp_path, engine):
    assert not list(tmp_path.glob("*.tmp"))


def test_engine_from_a_newer_sdk_warns(tmp_path):
    path = write_engine(tmp_path / "n.engine", {"versions": {"moon3-sdk": "99.0.0"}}, PARTS)
    with pytest.warns(UserWarning, match="built by moon3-sdk 99.0.0, newer than this"):
        EngineFile.read(path)
    same = write_engine(tmp_path / "s.engine", {"versions": {"moon3-sdk": "0.0.1"}}, PARTS)
    EngineFile.read(same)  # older or equal: silent (filterwarnings=error would fail otherwise)


# ------------------------------------------------------------------ lazy open: per-part verification


def _flip(path, part: str) -> None:
    with EngineFile.open(path) as e:
        off, size, _ = e._index[part]
    raw = bytearray(path.read_bytes())
    raw[off + size // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def test_open_reads_a_part_only_when_asked_and_verifies_it(engine):
    with EngineFile.open(engine) as e:
        assert e.part_names == list(PARTS) and e.manifest["dims"] == {"embedding": 256}
        assert e._parts == {}  # nothing read yet
        assert [e.part_size(n) for n in PARTS] == [len(d) for d in PARTS.values()]
        assert all(e.part(n) == d for n, d in PARTS.items())
        body_len = struct.unpack_from("<Q", engine.read_bytes(), 12)[0]
        assert e.digest == hashlib.sha256(engine.read_bytes()[52 : 52 + body_len]).hexdigest()
        assert e.digest == EngineFile.read(engine).digest
    with pytest.raises(EngineError, match=r"was closed; open it again to read part 'tokenizer\.json'"):
        e.part("tokenizer.json")


def test_open_refuses_a_damaged_part_only_when_it_is_read(engine):
    _flip(engine, "embedder.onnx")
    with pytest.raises(EngineError, match=r"checksum mismatch in part 'embedder\.onnx'"):
        EngineFile.read(engine)
    with EngineFile.open(engine) as e:  # header, manifest and part table are intact
        assert e.part("tokenizer.json") == PARTS["tokenizer.json"]
        for _ in range(2):  # refused every time, never cached
            with pytest.raises(EngineError, match=r"checksum mismatch in part 'embedder\.onnx'; the file was modified"):
                e.part("embedder.onnx")
        with pytest.raises(EngineError, match=r"checksum mismatch in part 'embedder\.onnx'"):
            e.verify()


@pytest.mark.parametrize("cut", [1, 20, 700])
def test_open_refuses_truncation_at_once(engine, cut):
    engine.write_bytes(engine.read_bytes()[:-cut])
    with pytest.raises(EngineError, match=r"truncated"):
        EngineFile.open(engine)


def test_a_file_truncated_after_the_open_is_refused_when_read(engine, tmp_path):
    """The descriptor opened is the file verified; shrinking it later gives a clear error, not a crash."""
    with EngineFile.open(engine) as e:
        with open(engine, "r+b") as f:
            f.truncate(engine.stat().st_size - 5)
        assert e.part("embedder.onnx") == PARTS["embedder.onnx"]
        with pytest.raises(EngineError,
                           match=r"part 'tokenizer\.json' extends past the end of the file; the file is truncated"):
            e.part("tokenizer.json")


def test_an_opened_file_keeps_reading_what_was_verified_when_the_path_is_replaced(engine, tmp_path):
    with EngineFile.open(engine) as e:
        write_engine(engine, {"other": True}, {"embedder.onnx": b"other bytes", "tokenizer.json": b"{}"})
        assert e.part("embedder.onnx") == PARTS["embedder.onnx"]


def test_open_of_a_missing_or_unreadable_path(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        EngineFile.open(tmp_path / "none.engine")
    with pytest.raises(EngineError, match="not found"):
        EngineFile.open(tmp_path)  # a folder
    (tmp_path / "t").write_bytes(b"")
    with pytest.raises(EngineError, match=r"not a moon3 engine \(only 0 bytes"):
        EngineFile.open(tmp_path / "t")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd (Linux)")
def test_loading_models_leaves_no_descriptor_open(tiny_engine, tmp_path):
    from sdk import Embedder

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    Embedder(tiny_engine.path, threads=1).close()  # imports and ONNX Runtime's own files first
    before = fds()
    for _ in range(5):
        Embedder(tiny_engine.path, threads=1).embed(texts=["red"])
    bad = tmp_path / "bad.engine"
    bad.write_bytes(tiny_engine.path.read_bytes()[:-1])
    for _ in range(3):
        with pytest.raises(EngineError):
            Embedder(bad, threads=1)
    e = EngineFile.open(tiny_engine.path)
    assert fds() == before + 1
    del e  # garbage collection closes it too
    assert fds() == before
