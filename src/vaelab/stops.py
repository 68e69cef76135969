"""Why training stopped, in one line each: a non-finite loss or state, or no memory left, with the run's cures.

Messages name the last good checkpoint (kept intact) and the flags that may cure the stop in this run.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import runs
from .config import RunConfig
from .errors import CheckpointError, TrainingError


def last_good(run_dir: Path) -> str:
    """The epoch of the run's last checkpoint, for error messages."""
    try:
        return f"epoch {runs.latest_checkpoint(run_dir).epoch}"
    except CheckpointError:
        return "none"


def out_of_memory(config: RunConfig, run_dir: Path, device: torch.device, epoch: int) -> TrainingError:
    """The error for a step that ran out of memory: the run's sizes, the last good checkpoint, and what to lower."""
    cfg = config.train
    samples = f", --k {cfg.k}" if cfg.k > 1 else ""  # K samples per example multiply the activations
    settings = "--batch-size, --hidden" + (" or --k" if samples else "")
    compiled = " (or train without --compile, which --resume may change)" if cfg.compile else ""
    return TrainingError(
        f"out of memory on {device} in epoch {epoch} (--batch-size {cfg.batch_size}, "
        f"--hidden {','.join(map(str, config.model.hidden))}{samples}); training stopped. The last good "
        f"checkpoint ({last_good(run_dir)}) is intact: free memory{compiled} and --resume, or start a new run "
        f"with a lower {settings} (--resume keeps the run's own)")


def non_finite(config: RunConfig, run_dir: Path, epoch: int, step: int, where: str) -> TrainingError:
    """The error for a loss (or state, `where`) that became NaN or infinite, with the last good checkpoint and cures."""
    return TrainingError(
        f"the {where} became NaN or infinite in epoch {epoch} (by step {step}); training stopped. "
        f"The last good checkpoint ({last_good(run_dir)}) in {run_dir / runs.CHECKPOINTS} is intact. "
        f"{cures(config)}")


def cures(config: RunConfig) -> str:
    """What may cure a non-finite loss in this run (gaussian-learned was offered to Bernoulli runs and to runs
    that had it)."""
    model, lr = config.model, config.train.lr
    sigma = (f", or a larger --sigma (now {model.sigma:g}) or --likelihood gaussian-learned"
             if model.likelihood == "gaussian" and model.model not in ("pca", "text-vae") else "")
    return (f"Lower --lr (now {lr:g}; `--resume --lr X` continues from that checkpoint), or check the data "
            f"for NaN/inf or huge values{sigma}.")


def non_finite_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> str | None:
    """The first weight, buffer or optimiser state that is not finite, by name, or None. They must be finite
    before they are saved: an HVAE's batch-norm running variance overflowed while its validation loss stayed
    finite, and the checkpoint kept as the last good one was refused as damaged by every later command; Adam's
    second moments at inf froze the weights silently. (One check per tensor, on its own device: the optimiser's
    step counts may live on the CPU.)"""
    names = {id(p): name for name, p in model.named_parameters()}
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               **{f"optimizer state {k} of {names.get(id(p), 'a parameter')}": v
                  for p, state in (optimizer.state.items() if optimizer else [])
                  for k, v in state.items() if isinstance(v, torch.Tensor)}}
    return next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
