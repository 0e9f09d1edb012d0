"""Tampered engine files on the real runtime (`sdk.Embedder` on the tiny engine): every kind of
damage is refused with a clear EngineError; reading never executes code from the file and writing
never touches anything outside its target."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import re
import struct
import sys

import numpy as np
import pytest

from sdk.engine import _HEADER, FORMAT_VERSION, MAGIC, EngineFile, write_engine
from sdk.errors import EngineError

pytest.importorskip("onnxruntime")


def layout(raw: bytes) -> tuple[int, dict, dict[str, tuple[int, int]]]:
    """-> (start of the parts, manifest, part name -> (absolute offset, size))."""
    n = struct.unpack_from("<Q", raw, 12)[0]
    man = json.loads(raw[_HEADER.size : _HEADER.size + n])
    start = _HEADER.size + n
    return start, man, {p["name"]: (start + p["offset"], p["size"]) for p in man["parts"]}


def forge(man: dict, data: bytes, version: int = FORMAT_VERSION) -> bytes:
    body = json.dumps(man).encode()
    return _HEADER.pack(MAGIC, version, len(body), hashlib.sha256(body).digest()) + body + data


def load(path):
    from sdk import Embedder

    return Embedder(path, threads=1)


@pytest.fixture(scope="module")
def raw(tiny_engine):
    return tiny_engine.path.read_bytes()


@pytest.fixture()
def bad(tmp_path):
    return tmp_path / "bad.engine"


def test_the_untouched_engine_loads(tiny_engine, raw):
    assert load(tiny_engine.path).embed(texts=["red shoe"]).shape == (1, 32)
    _, man, parts = layout(raw)
    assert sorted(parts) == ["embedder.onnx", "tokenizer.json"]


@pytest.mark.parametrize("part", ["embedder.onnx", "tokenizer.json"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_any_part_is_refused(raw, bad, part, where):
    _, _, parts = layout(raw)
    off, size = parts[part]
    pos = {"first": off, "middle": off + size // 2, "last": off + size - 1}[where]
    data = bytearray(raw)
    data[pos] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=rf"checksum mismatch in part '{part}'; the file was modified or corrupted"):
        load(bad)


def test_a_flipped_byte_in_any_part_of_a_split_engine_is_refused(tiny_split_engine, bad):
    """The split layout (image graph, text graph, NumPy head weights, tokenizer): same rule."""
    raw = tiny_split_engine.path.read_bytes()
    _, _, parts = layout(raw)
    assert len(parts) >= 4
    for part, (off, size) in parts.items():
        data = bytearray(raw)
        data[off + size // 2] ^= 0x01
        bad.write_bytes(bytes(data))
        with pytest.raises(EngineError, match=rf"checksum mismatch in part '{re.escape(part)}'"):
            load(bad)


@pytest.mark.parametrize(
    "field, pos, message",
    [
        ("magic", 0, r"not a moon3 engine file \(bad magic"),
        ("format version", 8, r"engine format version \d+ is not supported by this sdk"),
        ("manifest length", 12, r"manifest (length|checksum)"),
        ("manifest digest", 20, r"manifest checksum mismatch"),
        ("manifest", 60, r"manifest checksum mismatch"),
    ],
)
def test_a_flipped_byte_in_the_header_or_manifest_is_refused(raw, bad, field, pos, message):
    data = bytearray(raw)
    data[pos] ^= 0x04
    bad.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=message):
        load(bad)


@pytest.mark.parametrize("keep", ["0", "7", "header", "manifest", "embedder.onnx", "tokenizer.json", "all but 1"])
def test_a_truncated_file_is_refused(raw, bad, keep):
    start, _, parts = layout(raw)
    n = {"0": 0, "7": 7, "header": _HEADER.size, "manifest": start - 10, "all but 1": len(raw) - 1}.get(keep)
    if n is None:
        off, size = parts[keep]
        n = off + size // 2
    bad.write_bytes(raw[:n])
    with pytest.raises(EngineError, match=r"truncated|not a moon3 engine"):
        load(bad)


def test_appended_bytes_are_refused(raw, bad):
    bad.write_bytes(raw + b"\x00")
    with pytest.raises(EngineError, match=r"1 bytes after the last part; the file was modified or corrupted"):
        load(bad)


def test_a_manifest_from_another_engine_is_refused(tiny_engine, raw, bad, tmp_path):
    """Another engine's header + manifest (digest valid) grafted onto these parts."""
    e = EngineFile.read(tiny_engine.path)
    tok = e.part("tokenizer.json").replace(b"[UNK]", b"[ZZZ]", 1)  # same length, other bytes
    other = write_engine(tmp_path / "other.engine", e.manifest,
                         {"embedder.onnx": e.part("embedder.onnx"), "tokenizer.json": tok})
    o_start, _, _ = layout(other.read_bytes())
    start, _, _ = layout(raw)
    bad.write_bytes(other.read_bytes()[:o_start] + raw[start:])
    with pytest.raises(EngineError, match=r"checksum mismatch in part 'tokenizer\.json'"):
        load(bad)


def test_an_edited_manifest_is_refused(raw, bad):
    edited = raw.replace(b'"max_length": 12', b'"max_length": 99', 1)
    assert edited != raw
    bad.write_bytes(edited)
    with pytest.raises(EngineError, match=r"manifest checksum mismatch"):
        load(bad)


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 2**32 - 1])
def test_a_wrong_format_version_is_refused(raw, bad, version):
    start, man, _ = layout(raw)
    bad.write_bytes(forge(man, raw[start:], version=version))
    with pytest.raises(EngineError, match=rf"engine format version {version} is not supported by this sdk \(reads "
                                          rf"version {FORMAT_VERSION}\); rebuild the engine"):
        load(bad)


def test_header_and_manifest_versions_must_agree(raw, bad):
    start, man, _ = layout(raw)
    man["format_version"] = FORMAT_VERSION + 1
    bad.write_bytes(forge(man, raw[start:]))
    with pytest.raises(EngineError, match=rf"the manifest says format version {FORMAT_VERSION + 1}, the header "
                                          rf"{FORMAT_VERSION}"):
        load(bad)


@pytest.mark.parametrize("kind", ["onnx graph", "zip", "pickle", "json", "empty"])
def test_other_files_passed_as_an_engine_are_refused(tiny_engine, bad, kind):
    data = {
        "onnx graph": EngineFile.read(tiny_engine.path).part("embedder.onnx"),
        "zip": b"PK\x03\x04" + bytes(100),
        "pickle": pickle.dumps({"weights": [1, 2, 3]}),
        "json": json.dumps({"parts": []}).encode(),
        "empty": b"",
    }[kind]
    bad.write_bytes(data)
    with pytest.raises(EngineError, match=r"not a moon3 engine"):
        load(bad)


def test_a_tensorrt_plan_for_another_gpu_does_not_change_what_runs(tiny_engine, tmp_path):
    """The engine format can carry TensorRT plans as parts, but this runtime has no TensorRT
    backend yet and never reads them: an engine carrying a plan built for another GPU and
    TensorRT version loads with a warning naming the plan's GPU and TensorRT, runs the ONNX graph
    and gives the same vectors. A damaged plan part is never read by the embedder (parts are read
    lazily, only those it runs), and is refused by its checksum by whatever reads it: no part is
    trusted unverified."""
    e = EngineFile.read(tiny_engine.path)
    man = e.manifest
    man["tensorrt"] = {"plans": [{"part": "plans/sm_87-trt10.3.plan", "gpu_arch": "sm_87", "tensorrt": "10.3.0"}]}
    parts = {n: e.part(n) for n in e.part_names}
    parts["plans/sm_87-trt10.3.plan"] = b"\x00not-a-plan-for-this-gpu" * 64
    path = write_engine(tmp_path / "plan.engine", man, parts)
    items = {"images": [np.full((30, 20, 3), 90, np.uint8), None], "texts": ["red shoe", "blue shirt"]}
    with pytest.warns(RuntimeWarning, match=r"TensorRT plan\(s\) built for sm_87 / TensorRT 10\.3\.0; .* plans are ignored"):
        got = load(path)
    assert got.backend == "cpu"
    np.testing.assert_array_equal(got.embed(**items), load(tiny_engine.path).embed(**items))
    raw = bytearray(path.read_bytes())
    _, _, where = layout(bytes(raw))
    raw[where["plans/sm_87-trt10.3.plan"][0] + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match=r"plans are ignored"):
        np.testing.assert_array_equal(load(path).embed(**items), load(tiny_engine.path).embed(**items))
    with pytest.raises(EngineError, match=r"checksum mismatch in part 'plans/sm_87-trt10\.3\.plan'"):
        EngineFile.read(path)
    with EngineFile.open(path) as lazy, pytest.raises(EngineError, match=r"checksum mismatch in part 'plans/sm_87"):
        lazy.part("plans/sm_87-trt10.3.plan")


def _external(name: str, location: str, n: int = 32):
    from onnx import TensorProto, numpy_helper

    w = numpy_helper.from_array(np.zeros(n, np.float32), name)
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for k, v in (("location", location), ("offset", "0"), ("length", str(4 * n))):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    return w


def _graph_with_external_data(where: str, location: str) -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [32])
    if where == "initializer":
        g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [_external("w", location)])
    elif where == "constant node":
        g = helper.make_graph([helper.make_node("Constant", [], ["w"], value=_external("w", location)),
                               helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y])
    else:  # an If branch
        branch = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "b", [], [y], [_external("w", location)])
        ok = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "a", [], [y])
        c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
        g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=ok)], "g", [x, c], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("where", ["initializer", "constant node", "if branch"])
@pytest.mark.parametrize("location", ["w.bin", "../w.bin", "/etc/hostname"])
def test_a_graph_naming_external_files_is_refused(tiny_engine, tmp_path, monkeypatch, where, location):
    """ONNX Runtime reads a graph's external data relative to the working directory even when the
    graph comes from memory ('../' included): such a graph is refused before it is loaded."""
    pytest.importorskip("onnx")
    (tmp_path / "w.bin").write_bytes(np.ones(32, np.float32).tobytes())
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd" if location.startswith("..") else tmp_path)
    e = EngineFile.read(tiny_engine.path)
    path = write_engine(tmp_path / "ext.engine", e.manifest, {"embedder.onnx": _graph_with_external_data(where, location),
                                                              "tokenizer.json": e.part("tokenizer.json")})
    with pytest.raises(EngineError, match=r"part 'embedder\.onnx' keeps tensor data in external files \(w\); an "
                                          r"engine must be self-contained"):
        load(path)


def test_the_external_data_scan_on_real_graphs(tiny_engine):
    """The scan finds nothing in the tiny graph, every tensor once its data is moved out, and
    refuses bytes that are not a protobuf message."""
    onnx = pytest.importorskip("onnx")
    from sdk.onnxcheck import MalformedGraph, external_data_tensors

    graph = EngineFile.read(tiny_engine.path).part("embedder.onnx")
    assert external_data_tensors(graph) == []
    model = onnx.load_model_from_string(graph)
    onnx.external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=0)
    moved = sorted(t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    assert moved and sorted(external_data_tensors(model.SerializeToString())) == moved
    for junk in (b"\xff" * 12, b"\x0a\xff\xff\xff\xff\x0f", graph[:-3], graph + b"\x0b"):
        with pytest.raises(MalformedGraph):
            external_data_tensors(junk)


# ------------------------------------------------------------------ no code execution, no writes

_EVENTS: list[tuple[str, tuple]] = []
_ARMED = False
_WATCH = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "subprocess.Popen", "pickle.find_class",
          "marshal.load", "ctypes.dlopen", "socket.connect", "urllib.Request", "os.remove", "os.rename", "os.unlink",
          "os.rmdir", "os.mkdir", "os.symlink", "os.chmod", "shutil.", "exec", "compile", "builtins.input", "code.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _hook(event, args):
    if not _ARMED:
        return
    if event == "open":
        mode, flags = args[1], args[2]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes:
            _EVENTS.append((event, args))
    elif event.startswith(_WATCH):
        _EVENTS.append((event, args))


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def audit():
    sys.addaudithook(_hook)  # hooks cannot be removed; this one records only while armed

    class Audit:
        def __enter__(self):
            global _ARMED
            _EVENTS.clear()
            _ARMED = True
            return _EVENTS

        def __exit__(self, *exc):
            global _ARMED
            _ARMED = False

    return Audit()


def test_reading_never_executes_or_writes(tiny_engine, tmp_path, audit):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    e = EngineFile.read(tiny_engine.path)
    evil = {
        "pickle as graph": write_engine(tmp_path / "a.engine", e.manifest,
                                        {"embedder.onnx": payload, "tokenizer.json": e.part("tokenizer.json")}),
        "pickle as extra part": write_engine(tmp_path / "b.engine", {**e.manifest, "loader": "pickle"},
                                             {**{n: e.part(n) for n in e.part_names}, "model.pkl": payload}),
        "pickle as tokenizer": write_engine(tmp_path / "c.engine", e.manifest,
                                            {"embedder.onnx": e.part("embedder.onnx"), "tokenizer.json": payload}),
    }
    load(tiny_engine.path).embed(texts=["red"])  # warm up: imports done before the hook is armed
    before = sorted(os.listdir(tmp_path))
    with audit as events:
        for path in evil.values():
            try:
                load(path).embed(texts=["red"])
            except EngineError:
                pass
            EngineFile.read(path)
        load(tiny_engine.path).embed(texts=["red"])
    assert events == []
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == before


def test_writing_touches_only_its_target(tmp_path, audit):
    """A symlink at the target is replaced, not followed; a file or symlink where an old writer
    put its temporary file is left alone; the only writes are the target and its temporary file."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "x.engine"
    target.symlink_to(victim)
    (tmp_path / "out" / "x.engine.tmp").symlink_to(victim)
    with audit as events:
        write_engine(target, {"a": 1}, {"p": b"data"})
    assert victim.read_bytes() == b"keep me"
    assert target.is_file() and not target.is_symlink()
    assert EngineFile.read(target).part("p") == b"data"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.engine", "x.engine.tmp"]
    # (an "open" of an int is os.fdopen on the descriptor just created)
    written = {str(a[0]) for ev, a in events if ev == "open" and not isinstance(a[0], int)}
    written |= {str(a[1]) for ev, a in events if ev == "os.rename"}
    assert written and all(w.startswith(str(tmp_path / "out" / "x.engine")) for w in written), written
    assert {ev for ev, _ in events} <= {"open", "os.rename"}
