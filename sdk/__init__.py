"""moon3-sdk: compiled edge deployment of reasoning-aware multimodal product embeddings.

`import sdk` stays light: it never imports torch, onnxruntime or tensorrt.
"""

from sdk.errors import SdkError
from sdk.version import __version__

__all__ = ["Embedder", "Pipeline", "Reasoner", "SdkError", "__version__"]


def __getattr__(name: str):
    # Lazy: `from sdk import Embedder` loads the runtime (and onnxruntime, when an Embedder is
    # created) only when asked for, so `import sdk` stays light.
    if name == "Embedder":
        from sdk.embedder import Embedder

        return Embedder
    if name == "Pipeline":
        from sdk.pipeline import Pipeline

        return Pipeline
    if name == "Reasoner":
        from sdk.reasoner import Reasoner

        return Reasoner
    raise AttributeError(f"module 'sdk' has no attribute {name!r}")
