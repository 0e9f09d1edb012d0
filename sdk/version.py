"""The installed package's version, and the versions of the libraries an engine was built with
(what engine files and reports record)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moon3-sdk")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that make or run an engine (None: not installed)."""

    def v(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {p: v(p) for p in ("moon3-sdk", "onnx", "onnxruntime", "torch", "transformers", "tensorrt")}
