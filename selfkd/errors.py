"""Errors that the CLI reports as one line (no traceback unless --debug), and :func:`integer`, the one check
of an integer argument."""
import operator
from typing import SupportsIndex


class SelfKDError(Exception):
    """A user-facing error: bad input, bad config, bad data. The message is one line."""


class ConfigError(SelfKDError):
    """A config key or value is unknown or invalid."""


class DataError(SelfKDError):
    """A data set is missing, corrupt, or in the wrong layout."""


class TrainingError(SelfKDError):
    """Training cannot go on (e.g. a non-finite loss)."""


def integer(value: object, what: str, minimum: int | None = None) -> int:
    """``value`` as an int (a Python or NumPy integer or a 0-d integer tensor, not a bool) that is at least
    ``minimum``; ConfigError naming ``what`` otherwise."""
    try:
        number = operator.index(value) if isinstance(value, SupportsIndex) and not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"{what}: expected an integer{bound}, got {value!r}")
    return number
