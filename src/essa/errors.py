"""The one error type of essa that the ``essa`` command prints as one line (exit code 2).

Every error essa raises for a mistake in what the user asked for (a config key, a tuner, a data folder, a weights
file) is an :class:`EssaError`; the specific ones (``ConfigError``, ``TunerError``, ``DataError``,
``BackboneError``) are also ``ValueError``, so ``except ValueError`` keeps working.
"""


class EssaError(Exception):
    """A mistake in what the user asked for, or a problem with their files: one line, exit code 2."""
