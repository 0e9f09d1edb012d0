"""ONNX Runtime sessions of the runtime: the backends it knows (`BACKENDS`) and which this
onnxruntime build has, checked backend and thread arguments, the session options every runtime
object and export check uses (`session_kwargs`), the refusal of graphs with external data, and the
`providers` / `backend` an object's sessions really got (`ActiveBackend`).

Nothing here imports onnxruntime at import time; `onnxruntime()` does, with a clear error when
it is missing."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sdk.errors import BackendUnavailableError, EngineError


@dataclass(frozen=True)
class Backend:
    """An ONNX Runtime execution provider and the pip extra that brings it."""

    provider: str
    install: str | None  # what to pip install when this onnxruntime lacks the provider

# The backends this runtime knows; names are what `Embedder(providers=[...])` accepts.
BACKENDS: dict[str, Backend] = {
    "cpu": Backend("CPUExecutionProvider", None),
    "cuda": Backend("CUDAExecutionProvider", "pip install 'moon3-sdk[gpu]' (onnxruntime-gpu)"),
    "tensorrt": Backend(
        "TensorrtExecutionProvider", "pip install 'moon3-sdk[gpu,trt]' (onnxruntime-gpu and TensorRT)"
    ),
}


def available_backends() -> list[str]:
    """Names in `BACKENDS` whose execution provider this onnxruntime build has.

    Raises:
        BackendUnavailableError: onnxruntime is not installed.
    """
    have = set(onnxruntime().get_available_providers())
    return [name for name, b in BACKENDS.items() if b.provider in have]


class ActiveBackend:
    """`providers` and `backend` of a runtime object whose sessions set `_providers`."""

    _providers: tuple[str, ...] = ()

    @property
    def providers(self) -> tuple[str, ...]:
        """ONNX Runtime execution providers really active, in priority order."""
        return self._providers

    @property
    def backend(self) -> str:
        """Name (as in `BACKENDS`) of the highest-priority backend really active."""
        return backend_of(self._providers)

    def _load(self, path, providers: str | Sequence[str] | None, threads: int | None) -> None:
        """Check `providers` and `threads`, open the engine file at `path` (lazily: each part is
        read, and checked against its checksum, when `_init` reads it; a given `EngineFile` stays
        open) and run the subclass's `_init(engine, backend names, threads, onnxruntime)` on it."""
        from sdk.engine import EngineFile

        names, ort = runtime_backends(providers, threads)
        own = not isinstance(path, EngineFile)
        engine = EngineFile.open(path) if own else path
        try:
            self._init(engine, names, threads, ort)
        finally:
            if own:
                engine.close()

    def _init(self, engine, names: list[str], threads: int | None, ort) -> None:
        raise NotImplementedError

    def _activate(self, active: Sequence[str], names: Sequence[str], what: str) -> None:
        """Record the providers a session really got and warn, naming what runs, when a requested
        backend (of `names`) is not among them. Called from `_init`, called by `_load` from `__init__`."""
        self._providers = tuple(active)
        missing = [n for n in names if BACKENDS[n].provider not in self._providers]
        if missing:
            warnings.warn(
                f"requested backend(s) {missing} are not active in onnxruntime (active providers: "
                f"{list(self._providers)}); {what} runs on {self.backend!r}. Check the GPU drivers / CUDA / "
                f"TensorRT libraries.",
                RuntimeWarning,
                stacklevel=5,  # the caller of __init__ (__init__ -> _load -> _init -> _activate)
            )


def runtime_backends(providers: str | Sequence[str] | None, threads: int | None) -> tuple[list[str], Any]:
    """Checked `providers` and `threads` of a runtime object -> (backend names, onnxruntime).

    Raises:
        ValueError: an unknown backend name or bad `threads`.
        BackendUnavailableError: a backend this onnxruntime build lacks.
    """
    names = backend_names(providers)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    ort = onnxruntime()
    check_available(names, ort)
    return names, ort


def check_available(names: Sequence[str], ort) -> None:
    """Raise BackendUnavailableError for a backend (a `BACKENDS` name) whose provider this
    onnxruntime build lacks, naming what to install."""
    have = set(ort.get_available_providers())
    for name in names:
        b = BACKENDS[name]
        if b.provider not in have:
            raise BackendUnavailableError(
                f"backend {name!r} needs {b.provider}, which this onnxruntime {ort.__version__} does not have "
                f"(it has {sorted(have)}); {b.install}"
            )


def backend_of(providers: Sequence[str]) -> str:
    """The `BACKENDS` name of the first of these active onnxruntime providers that has one (else
    the provider's own name; "none" for no provider)."""
    by_provider = {b.provider: name for name, b in BACKENDS.items()}
    for p in providers:
        if p in by_provider:
            return by_provider[p]
    return providers[0] if providers else "none"


def onnxruntime():
    """The onnxruntime module.

    Raises:
        BackendUnavailableError: onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError("the embedder runtime needs onnxruntime: pip install moon3-sdk") from exc
    return ort


def backend_names(providers: str | Sequence[str] | None) -> list[str]:
    """Checked, deduplicated backend names (`BACKENDS` keys; None: ["cpu"]).

    Raises:
        ValueError: an unknown name, or none.
    """
    if providers is None:
        return ["cpu"]
    if isinstance(providers, str):
        providers = [providers]
    names: list[str] = []
    for p in providers:
        if p not in BACKENDS:
            raise ValueError(f"unknown backend {p!r}; available: {sorted(BACKENDS)}")
        if p not in names:
            names.append(p)
    if not names:
        raise ValueError(f"providers is empty; name at least one of {sorted(BACKENDS)}")
    return names

# onnxruntime graph rewrites that make the CPU slower, turned off in every CPU-only session.
# SkipLayerNormFusion: onnxruntime's CPU SkipLayerNormalization kernel took ~1 ms on a
# (32, 15, 384) tensor where the Add + LayerNormalization it replaces take 0.14 ms (onnxruntime
# 1.32, one thread); without it the INT8 MiniLM text graph runs ~1.45x as fast, with the same
# float arithmetic. GPU sessions keep it (their fused kernel is the fast one).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session_kwargs(providers: str | Sequence[str]) -> dict[str, Any]:
    """Extra `onnxruntime.InferenceSession` arguments for these execution providers (onnxruntime
    names, e.g. ["CPUExecutionProvider"]; one name may be given as a str)."""
    if (list(providers) if not isinstance(providers, str) else [providers]) == ["CPUExecutionProvider"]:
        return {"disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS)}
    return {}


class EngineSessions:
    """Opens an engine's ONNX parts as onnxruntime sessions, all with one set of options: the
    requested backends' providers in order, `threads` intra-op threads, `session_kwargs`.

    A session whose graph another one follows within the same call (`open(..., spin=False)`: the
    image graph, which the text graph follows for a photo + title) gets its pool's spin-waiting
    off when it has more than one thread: otherwise its idle worker spins on a core the next
    graph's pool needs. Titles alone keep spinning, which makes them faster. Both measured against
    spinning everywhere and nowhere: `benchmarks/spin_wait.py`, docs/results/spin_wait.json.
    """

    def __init__(self, engine, names: Sequence[str], threads: int | None, ort):
        self.engine, self.ort = engine, ort
        self.options = ort.SessionOptions()
        self.quiet_options = ort.SessionOptions()  # the same, without spin-waiting between runs
        self.quiet_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            self.options.intra_op_num_threads = threads
            self.quiet_options.intra_op_num_threads = threads
        self.threads = threads
        self.providers = [BACKENDS[n].provider for n in names]

    def open(self, part: str, what: str = "part", spin: bool = True):
        """The session of engine part `part` (checksum-verified when read; a graph with external
        data is refused first); `spin=False`: a graph that another one follows in the same call
        (see the class doc; no effect with one thread, which has no pool).

        Raises:
            EngineError: onnxruntime cannot load it, naming the engine, `what` and the part.
        """
        graph = self.engine.part(part)
        refuse_external_data(graph, self.engine.path, part, self.ort.__version__)
        options = self.options if spin or self.threads == 1 else self.quiet_options
        try:
            return self.ort.InferenceSession(graph, options, providers=self.providers,
                                             **session_kwargs(self.providers))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own unrelated exception types
            raise EngineError(f"{self.engine.path}: onnxruntime {self.ort.__version__} cannot load {what} "
                              f"{part!r}: {exc}") from exc


def refuse_external_data(graph: bytes, where: Path, part: str, ort_version: str) -> None:
    """An engine is self-contained: a graph naming external data files (which ONNX Runtime would
    read relative to the working directory) is refused before it is loaded."""
    from sdk.onnxcheck import MalformedGraph, external_data_tensors

    try:
        external = external_data_tensors(graph)
    except MalformedGraph as exc:
        raise EngineError(
            f"{where}: the runtime (onnxruntime {ort_version}) cannot load part {part!r}: not a valid ONNX graph ({exc})"
        ) from None
    if external:
        raise EngineError(
            f"{where}: part {part!r} keeps tensor data in external files ({', '.join(external[:5])}); "
            "an engine must be self-contained"
        )
