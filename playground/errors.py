"""Errors the playground raises on purpose; each carries a message meant for the user."""


class PlaygroundError(Exception):
    """Base class: the message is shown as is in the UI and in API error bodies."""


class ModelFolderError(PlaygroundError):
    """A model folder is missing, incomplete or corrupt. The message names the file at fault."""


class ModelNotLoadedError(PlaygroundError):
    """No model is loaded (or one is still loading)."""


class LoadInProgressError(PlaygroundError):
    """Another load is running; loads are not stacked."""


class ParameterError(PlaygroundError):
    """A sampling or request parameter is out of range or of the wrong type."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def not_unicode(text: str, what: str) -> str | None:
    """Why `text` cannot be stored or tokenized, naming `what`; None when it can.

    JSON's "\\ud800" escapes decode to a lone UTF-16 surrogate: a Python str that no UTF-8 encoder takes, so the
    tokenizer, SQLite and httpx would all fail on it further in.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"{what} contains {exc.object[exc.start]!r}, half of a UTF-16 surrogate pair, which is not a "
                "character; send valid Unicode text")
    return None
