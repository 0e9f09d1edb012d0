"""Exporting torch modules to ONNX, the project's way: the dynamo exporter with known-harmless
warnings and noisy loggers quieted around the call (anything else reaches the caller), outputs and
inputs renamed, the ONNX checker run; `ort_session` opens an exported graph with the runtime's
session settings for parity checks; `ExportError` is what every export step raises."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdk.errors import BackendUnavailableError, SdkError

# Exporter warnings known to be harmless here, as (category, message regex), ignored only around
# the exporter call; anything else reaches the caller.
_HARMLESS_WARNINGS = (
    # FusionEmbedder stores `last_gate` (a diagnostic) in forward; torch.export restores the
    # attribute after tracing and the graph does not depend on it.
    (UserWarning, r"The tensor attribute .*last_gate was assigned during export"),
    # Each named Dim shared by several inputs (batch on all six) is reported once per extra use;
    # the ONNX axes still get the names (checked by the tests).
    (UserWarning, r"# The axis name: .* will not be used"),
    # torch internals calling their own deprecated APIs.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


class ExportError(SdkError):
    """An export step failed or its artifact failed its numeric check against the source model.

    Attributes:
        report: the parity report when the numeric check failed (else None).
    """

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report


def require(module: str, hint: str):
    """Import `module`, or raise BackendUnavailableError with `hint` (what to install) when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(hint) from exc


def ort_session(path: Path, num_threads: int):
    """A CPU onnxruntime session of an exported graph for the export's parity checks, with the
    runtime's session settings (`sdk.sessions.session_kwargs`)."""
    ort = require("onnxruntime", "the parity check needs onnxruntime: pip install onnxruntime")
    opts = ort.SessionOptions()
    if num_threads:
        opts.intra_op_num_threads = num_threads
    try:
        from sdk.sessions import session_kwargs  # the runtime's session settings

        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                    **session_kwargs(["CPUExecutionProvider"]))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own unrelated exception types
        raise ExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc


_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer._constant_folding")


@contextlib.contextmanager
def harmless_warnings_ignored():
    # torch.onnx logs one "torchvision is not installed. Skipping torchvision::..." per torchvision
    # op at every export, and onnxscript's optimizer that it skips folding multi-output Splits:
    # noise for these graphs (no torchvision op; the Splits run as they are)
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category, message in _HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def rename_output(model, name: str) -> None:
    """Give the graph's single output `name`, first renaming any other value that holds it."""
    if len(model.graph.outputs) != 1:
        raise ExportError(f"expected one graph output, the exporter produced {len(model.graph.outputs)}")
    rename_outputs_to(model, [name])


def rename_outputs_to(model, names: list[str]) -> None:
    """Give the graph's outputs `names` (in order), first renaming other values that hold them."""
    graph = model.graph
    outs = list(graph.outputs)
    if len(outs) != len(names):
        raise ExportError(f"expected {len(names)} graph outputs, the exporter produced {len(outs)}")
    values = list(graph.inputs) + list(graph.initializers.values())
    values += [v for node in graph.all_nodes() for v in node.outputs]
    taken = {v.name for v in values}
    for out, name in zip(outs, names):
        if out.name == name:
            continue
        for v in values:
            if v is not out and v.name == name:
                k = 1
                while f"{name}_{k}" in taken:
                    k += 1
                v.name = f"{name}_{k}"
                taken.add(v.name)
        out.name = name
        taken.add(name)


def check_valid(path: Path) -> None:
    """Reject a file the ONNX checker rejects."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path} is not a valid ONNX model: {exc}") from exc


def export_module(module: nn.Module, args: tuple, dynamic: dict, outputs: list[str], path: Path, opset: int,
                  inputs: list[str] | None = None) -> None:
    """torch.onnx.export (dynamo) of one module to `path` (weights inline), its outputs named
    `outputs` and, given `inputs`, its (flattened) inputs renamed in order; the file must pass the
    ONNX checker."""
    with harmless_warnings_ignored(), torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                    optimize=True, verbose=False)
    if inputs is not None:
        got = list(program.model.graph.inputs)
        if len(got) != len(inputs):
            raise ExportError(f"expected {len(inputs)} graph inputs, the exporter produced {len(got)}")
        for value, name in zip(got, inputs):
            value.name = name
    rename_outputs_to(program.model, outputs)
    program.save(str(path), external_data=False)
    check_valid(path)
