"""Error types: every failure a user can cause is one of these, with a one-line message naming the fix."""


class VaelabError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class DataError(VaelabError):
    """A data set cannot be found, read, downloaded or used as asked."""


class ConfigError(VaelabError):
    """A configuration (flags or config.json) is invalid."""


class CheckpointError(VaelabError):
    """A run directory or checkpoint is missing, truncated or not vaelab's."""


class TrainingError(VaelabError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class InputError(VaelabError, ValueError):
    """A tensor or count passed to a model's method (encode, decode, sample, ...) has the wrong shape or type."""
