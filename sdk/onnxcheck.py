"""Checks on a serialized ONNX graph before ONNX Runtime sees it (pure Python, no `onnx` needed).

A graph loaded from memory may still name *external data* files for its tensors; ONNX Runtime
then reads them relative to the working directory, `../` included. An engine is one
self-contained file, so a graph that points at files is refused before it is loaded.
"""

from __future__ import annotations

# Message fields that hold messages, per ONNX message type (onnx/onnx.proto field numbers).
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}
_TENSOR_NAME, _EXTERNAL_DATA, _DATA_LOCATION = 8, 13, 14
_MAX_DEPTH = 64


class MalformedGraph(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise MalformedGraph("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """Yield (field number, wire type, value): int for varints, memoryview for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise MalformedGraph(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise MalformedGraph("field runs past the end of its message")
        yield field, wire, value


def external_data_tensors(graph: bytes) -> list[str]:
    """Names of the tensors of a serialized ModelProto that keep their data in external files.

    Raises:
        MalformedGraph: the bytes are not a well-formed protobuf message, or nest too deep.
    """
    found: list[str] = []
    stack = [("model", memoryview(graph), 0)]
    while stack:
        kind, buf, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise MalformedGraph(f"messages nest deeper than {_MAX_DEPTH}")
        name, external = "?", False
        for field, wire, value in _fields(buf):
            if kind == "tensor":
                if field == _TENSOR_NAME and wire == 2:
                    name = bytes(value).decode("utf-8", "replace")
                elif field == _EXTERNAL_DATA or (field == _DATA_LOCATION and value):
                    external = True
            elif wire == 2 and field in _CHILDREN[kind]:
                stack.append((_CHILDREN[kind][field], value, depth + 1))
        if external:
            found.append(name)
    return found
