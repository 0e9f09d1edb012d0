"""One exception hierarchy for the SDK; every error the runtime raises derives from SdkError."""

from __future__ import annotations


class SdkError(Exception):
    """Base class of every error raised by moon3-sdk."""


class InvalidInputError(SdkError, ValueError):
    """An input item (image, text, array) could not be used; the message names the item."""


class EngineError(SdkError):
    """A model or engine file is missing, damaged or of an unsupported format."""


class IndexFileError(SdkError):
    """A vector index folder is missing, damaged, of an unsupported format, or was built with
    another engine than the one given; the message says which."""


class BackendUnavailableError(SdkError, ImportError):
    """A requested backend or optional dependency is not installed; the message names the extra."""


class BatchError(InvalidInputError):
    """Some items of a batch could not be embedded; the good ones are kept on the exception.

    Attributes:
        vectors: (N, dim) float32 array of the whole batch; the rows of bad items are NaN.
        errors: item index -> what was wrong with it (every bad item, in index order).
    """

    def __init__(self, message: str, vectors, errors: dict[int, str]):
        super().__init__(message)
        self.vectors = vectors
        self.errors = errors

    @property
    def ok(self):
        """(N,) bool mask of the items that were embedded."""
        import numpy as np

        ok = np.ones(len(self.vectors), dtype=bool)
        ok[list(self.errors)] = False
        return ok


class TruncationWarning(UserWarning):
    """Text longer than the engine's token budget was cut; filter it to silence it."""
