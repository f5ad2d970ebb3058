"""The one error type of essa that the ``essa`` command prints as one line (exit code 2; :class:`Interrupted`: 130).

Every error essa raises for a mistake in what the user asked for (a config key, a tuner, a data folder, a weights
file) is an :class:`EssaError`; the specific ones (``ConfigError``, ``TunerError``, ``DataError``,
``BackboneError``, ``InputError``) are also ``ValueError``, so ``except ValueError`` keeps working; a missing file or
folder is a :class:`NotFoundError`, also a ``FileNotFoundError``. Any other exception is a bug: the command lets it
through with its traceback.
"""


class EssaError(Exception):
    """A mistake in what the user asked for, or a problem with their files: one line, exit code 2."""


class InputError(EssaError, ValueError):
    """A user's input that essa cannot use and that is none of the specific kinds (a config key, a tuner, data, a
    weights file): e.g. a classifier checkpoint for the wrong task, a command-line option that does not parse."""


class NotFoundError(EssaError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError)."""


class Interrupted(EssaError):
    """A run stopped on request (Ctrl-C, SIGINT): one line saying what was saved and how to continue, exit code 130
    (128 + SIGINT), as a shell reports a command that Ctrl-C stopped. ``where`` says where it stopped and what it
    saved, without the advice of the message (a study gives its own)."""

    exit_code = 130

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = where or message
