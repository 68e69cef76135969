"""Error types: every failure a user can cause is one of these, with a one-line message naming the fix."""
from __future__ import annotations

import re


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


def out_of_memory_message(e: BaseException, *, evaluating: bool = False) -> str | None:
    """One line for an allocation failure (MemoryError, torch's CPU or CUDA out-of-memory RuntimeError), naming the
    size asked for where the error gives it and the settings that set it (evaluating: evaluate's own, not the
    training flags it cannot take); None for any other error."""
    if not is_out_of_memory(e):
        return None
    text = str(e)
    size = re.search(r"[Tt]ried to allocate (\d+ bytes|[\d.]+ [KMGT]i?B)", text)  # CPU: bytes; CUDA: "2.00 GiB"
    amount = "" if size is None else size.group(1)
    amount = f"{int(amount.split()[0]) / 1e9:.1f} GB" if amount.endswith(" bytes") else amount
    asked = f" (an allocation of {amount})" if amount else ""
    if evaluating:
        return (f"out of memory{asked}: give evaluate a smaller --chunk (importance samples per pass; memory does "
                "not grow with --k) or --no-probe, or use a machine or device with more memory")
    return (f"out of memory{asked}: make the model or its batches smaller (--batch-size, --hidden, --latent-dim) "
            "or use a machine or device with more memory; finished checkpoints are intact")
