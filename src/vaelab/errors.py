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


def is_out_of_memory(e: BaseException) -> bool:
    """Whether an exception means an allocation failed: MemoryError (numpy), torch.OutOfMemoryError (CUDA), or
    the RuntimeError of torch's CPU or MPS allocator (matched by message; errors.py does not import torch)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
