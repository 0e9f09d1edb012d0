"""moon3-sdk: compiled edge deployment of reasoning-aware multimodal product embeddings.

`import sdk` stays light: it never imports torch, onnxruntime or tensorrt.
"""

from importlib.metadata import PackageNotFoundError, version

from sdk.errors import SdkError

try:
    __version__ = version("moon3-sdk")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

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
