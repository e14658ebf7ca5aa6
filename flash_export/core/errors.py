"""Typed errors: the only exceptions the CLI turns into one-line messages."""


class FlashExportError(Exception):
    """Base class of every error flash-export raises on purpose."""


class ModelError(FlashExportError):
    """The model could not be built or its weights could not be loaded."""


class ConversionError(FlashExportError):
    """An nn.MultiheadAttention feature that a FlashAttention-based replacement cannot match.

    Raised by `flash_export.convert` for what it refuses to convert, and by a converted module
    for a call it cannot compute exactly (attention weights, additive float masks, dropout).
    """


class ExportError(FlashExportError):
    """An artifact could not be exported."""


class ArtifactError(FlashExportError):
    """An artifact is missing, unreadable, untrusted or not what flash-export wrote."""


class RuntimeLibraryError(FlashExportError):
    """The native kernel library is missing or cannot be registered in onnxruntime."""


class ValidationError(FlashExportError):
    """An artifact's outputs do not match the reference."""


class RequestError(FlashExportError):
    """A served request that cannot be answered: `status` is the HTTP status to reply with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def summary(exc: BaseException) -> str:
    """`Type: message` on one line (just `Type` when empty), cut after about 400 characters.

    The whole message with its whitespace collapsed: onnxruntime and torch spread the useful part
    of an error over several lines. A longer one ends at a word, with " ...".
    """
    kind = type(exc).__name__
    text = " ".join(str(exc).split())
    line = f"{kind}: {text}" if text else kind
    if len(line) <= 400:
        return line
    return line[:400].rsplit(" ", 1)[0] + " ..."
