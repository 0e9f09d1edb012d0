"""One runner per embedder layout: a feed keyed by `sdk.contract.INPUT_NAMES` -> (B, dim) vectors.

* "single": `GraphRunner`, one ONNX graph that does everything;
* "split": `sdk.head.SplitRunner`, image and text graphs, the NumPy/C++ fusion head, and the
  optional completion graph.

`open_runner` reads the parts a layout needs from the engine, checks them against the contract
and returns the runner; `sdk.Embedder` is the facade over it (inputs, batching, errors).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from sdk.contract import (
    EmbedderSpec,
    check_completion_graph,
    check_graph,
    check_split_graphs,
    completion_part,
)
from sdk.engine import EngineFile
from sdk.errors import EngineError
from sdk.head import FusionHead, SplitRunner

__all__ = ["GraphRunner", "Runner", "open_runner"]


class GraphRunner:
    """The single layout: one ONNX graph from the ABI inputs to the L2-normalised embedding."""

    completion_session = None  # a single-layout engine completes nothing

    def __init__(self, session: Any, output: str):
        self.session = session
        self.output = output

    def __call__(self, feed: Mapping[str, np.ndarray], complete_image: bool = False) -> np.ndarray:
        return self.session.run([self.output], dict(feed))[0]  # (B, D)


Runner = GraphRunner | SplitRunner


def open_runner(engine: EngineFile, spec: EmbedderSpec, load: Callable[[str], Any]) -> tuple[Runner, Any]:
    """The runner of `spec.layout` over the engine's parts, each checked against the contract.

    Args:
        load: (part name, what, spin=...) -> ONNX Runtime session (`sdk.sessions.EngineSessions.open`).

    Returns:
        (runner, the session whose providers tell the backend that runs).

    Raises:
        EngineError: a graph or the head does not match the manifest.
    """
    where = engine.path
    if spec.layout != "split":
        session = load(spec.parts["embedder"])
        check_graph(session, where, spec.output, spec.dim, spec.image.size)
        return GraphRunner(session, spec.output), session
    # the image graph (and the completion graph) run before the text graph within a call: their
    # thread pools must not spin-wait on the cores the text graph's pool needs next
    image_s, text_s = load(spec.parts["image"], spin=False), load(spec.parts["text"])
    head = FusionHead.from_bytes(engine.part(spec.parts["head"]), f"{where}: part {spec.parts['head']!r}")
    check_split_graphs(image_s, text_s, where, spec.image.size, head.skip_path)
    if head.out_dim != spec.dim:
        raise EngineError(f"{where}: the head gives {head.out_dim}-d vectors, the manifest says dim {spec.dim}")
    completion = None
    if engine.manifest.get("completion") is not None:
        completion = load(completion_part(engine.manifest["completion"], where), spin=False)
        check_completion_graph(completion, where, int(head.config.get("n_image_tokens", 49)), head.d,
                               head.out_dim if head.skip_path else None)
    return SplitRunner(image_s, text_s, head, completion), image_s
