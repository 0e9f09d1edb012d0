"""One exception hierarchy for the SDK; every error the runtime raises derives from SdkError."""

from __future__ import annotations


class SdkError(Exception):
    """Base class of every error raised by moon3-sdk."""


class InvalidInputError(SdkError, ValueError):
    """An input item (image, text, array) could not be used; the message names the item."""


class EngineError(SdkError):
    """A model or engine file is missing, damaged or of an unsupported format."""


class BackendUnavailableError(SdkError, ImportError):
    """A requested backend or optional dependency is not installed; the message names the extra."""
