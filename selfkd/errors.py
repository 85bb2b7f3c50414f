"""Errors that the CLI reports as one line (no traceback unless --debug)."""


class SelfKDError(Exception):
    """A user-facing error: bad input, bad config, bad data. The message is one line."""


class ConfigError(SelfKDError):
    """A config key or value is unknown or invalid."""


class DataError(SelfKDError):
    """A data set is missing, corrupt, or in the wrong layout."""


class TrainingError(SelfKDError):
    """Training cannot go on (e.g. a non-finite loss)."""
