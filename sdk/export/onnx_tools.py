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

import numpy as np
import torch
from torch import nn

from sdk.errors import BackendUnavailableError, SdkError
from sdk.version import library_versions

PARITY_FORMAT = 1  # version of the parity reports written beside exported graphs

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


def check_parity_settings(min_cosine: float, check_batches: Any, axes: tuple[str, ...]) -> None:
    """An export config's parity settings: a cosine gate in (0, 1], and check batches that are
    tuples of len(axes) sizes >= 1 (`axes` names them in the message)."""
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine}")
    if not check_batches or any(len(s) != len(axes) or min(s) < 1 for s in check_batches):
        kind = {2: "pairs", 3: "triples"}.get(len(axes), "tuples")
        raise ValueError(f"check_batches must be ({', '.join(axes)}) {kind} >= 1, got {check_batches}")


def parity_stats(got: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, float, float]:
    """An exported graph's rows `got` (B, D) against the source model's `want` -> (per-row cosine,
    largest absolute error, worst cosine: NaN where any row's is NaN)."""
    cos = row_cosine(got, want)
    err = float(np.abs(got.astype(np.float64) - want).max())
    return cos, err, worst_cosine(cos)


def worst_cosine(cos: np.ndarray) -> float:
    """The smallest of per-row cosines, NaN where any is NaN."""
    return float(np.nan if np.isnan(cos).any() else cos.min())


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine of two (B, D) arrays in float64; a zero row gives 0, a NaN stays NaN."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.where(den > 0, den, 1.0)


class ParityCheck:
    """An exported graph's parity with its source model, batch by batch: `add` each check batch's
    outputs, then `report()` (passed, worst and mean cosine, largest error, the first failure)."""

    def __init__(self, model: str, min_cosine: float, opset: int, mean: bool = False):
        self.model, self.min_cosine, self.opset, self.mean = model, min_cosine, opset, mean
        self.batches: list[dict[str, Any]] = []
        self.failure: str | None = None
        self._cos: list[np.ndarray] = []

    def add(self, got: np.ndarray, want: np.ndarray, shape: dict[str, int], where: str) -> None:
        """One check batch: rows `got` (B, D) of the export against `want` of the source model."""
        cos, err, worst = parity_stats(got, want)
        self.batches.append({**shape, "min_cosine": worst, **({"mean_cosine": float(cos.mean())} if self.mean else {}),
                             "max_abs_err": err})
        self._cos.append(cos)
        if self.failure is None and not bool(np.all(cos >= self.min_cosine)):
            self.failure = (f"{self.model} parity failed on {where}: worst cosine {worst:.6f} < min_cosine "
                            f"{self.min_cosine}; max abs error {err:.3g}")

    def report(self, **extra: Any) -> dict[str, Any]:
        cos = np.concatenate(self._cos)
        report = {"format": PARITY_FORMAT, "model": self.model, "min_cosine_gate": self.min_cosine,
                  "min_cosine": worst_cosine(cos), **({"mean_cosine": float(cos.mean())} if self.mean else {}),
                  "max_abs_err": max(b["max_abs_err"] for b in self.batches), "rows": int(cos.size),
                  "batches": self.batches, "passed": self.failure is None, "exporter": "dynamo", "opset": self.opset,
                  **extra, "versions": library_versions()}
        if self.failure:
            report["failure"] = self.failure
        return report
