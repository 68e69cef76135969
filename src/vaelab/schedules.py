"""Schedules over a run's epochs: the KL weight (warm-up, cyclical annealing) and the learning rate (cosine).

Each is a function of the fractional epoch the step is at, so a resumed run recomputes it exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from .config import TrainConfig
from .errors import ConfigError


def kl_weight(config: TrainConfig, progress_epochs: float) -> float:
    """The KL weight after `progress_epochs` (fractional) epochs of training.

    Linear warm-up: beta * min(1, t / warmup) (Bowman et al. 2016; Sonderby et al. 2016). Cyclical
    annealing: the run splits into kl_cycles equal cycles, and in each the weight rises linearly from 0
    to beta over the first kl_cycle_ratio of it, then holds (Fu et al. 2019, eq. 3).
    """
    if config.kl_cycles > 0:
        cycles = progress_epochs * config.kl_cycles / config.epochs
        # the fraction of the current cycle; a cycle's start reached up to rounding (0.3 % 0.1 is 0.0999...,
        # which read as the end of the cycle before) is its start
        phase = max(0.0, cycles - math.floor(cycles + 1e-9))
        return config.beta * min(1.0, phase / config.kl_cycle_ratio)
    if config.warmup_epochs <= 0:
        return config.beta
    return config.beta * min(1.0, progress_epochs / config.warmup_epochs)


def check_cycles(cfg: TrainConfig, steps_per_epoch: int) -> None:
    """Refuse --kl-cycles whose rise spans less than one step, or cycles of one step: each step's weight was then 0
    or beta as float rounding fell, or 0 at every step (with 100 one-step cycles the KL term was off for the run)."""
    if not (cfg.kl_cycles and cfg.epochs):
        return
    steps = steps_per_epoch * cfg.epochs
    per_cycle = steps / cfg.kl_cycles
    if per_cycle < 2 or per_cycle * cfg.kl_cycle_ratio < 1 - 1e-9:  # (25 steps x 0.36 / 9 cycles is 0.99999...)
        most = math.floor(min(steps / 2, steps * cfg.kl_cycle_ratio))
        fix = f"use at most {most} cycles, or more --epochs" if most else "give more --epochs"
        rise = per_cycle * cfg.kl_cycle_ratio
        raise ConfigError(f"--kl-cycles {cfg.kl_cycles}: the run has {steps} steps, so each cycle has {per_cycle:.2g} "
                          f"and its rise (--kl-cycle-ratio {cfg.kl_cycle_ratio:g}) {rise:.2g}; a cycle needs 2 steps "
                          f"and a rise of 1; {fix}")


def cosine_rate(peak: float, floor: float, fraction: float) -> float:
    """floor + (peak - floor) (1 + cos(pi t)) / 2 at t = fraction of the run, clamped to [0, 1].

    Cosine annealing without restarts (Loshchilov & Hutter 2017, "SGDR", eq. 5), as NVAE anneals its rate.
    """
    t = min(1.0, max(0.0, fraction))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * t))


def learning_rate(config: TrainConfig, progress_epochs: float) -> float:
    """The rate after `progress_epochs` (fractional) epochs: lr, or its cosine annealing over config.epochs.

    A --resume with another --epochs redraws the cosine over the new length (see resume_note).
    """
    if config.lr_schedule == "cosine" and config.epochs > 0:
        return cosine_rate(config.lr, config.lr_min, progress_epochs / config.epochs)
    return config.lr


def warmup_note(config: TrainConfig) -> str | None:
    """A warm-up longer than the run, or None: the KL weight never reached --beta, silently."""
    if config.kl_cycles or config.warmup_epochs <= config.epochs:
        return None
    return (f"note: the KL warm-up ({config.warmup_epochs:g} epochs) outlasts the run ({config.epochs} epochs): the KL "
            f"weight ends at {kl_weight(config, config.epochs):.3g}, not beta {config.beta:g}, so the model is trained "
            "on a down-weighted KL throughout (validation losses are the true bound); train for at least as many "
            "epochs as the warm-up")


def resume_note(before: TrainConfig, after: TrainConfig, epoch: int, last: dict | None) -> str | None:
    """What a --resume with another --epochs does to the schedules that span the run, or None.

    The cosine rate and the KL cycles are fractions of config.epochs, so a new length moves them at
    once: extending a finished cosine run raises its rate again, and cycles get longer. Each value is
    compared with the old schedule's at the same point or, where the run had finished, with its last
    step's, from `last`: the metrics record of the checkpoint's epoch, when there is one.
    """
    def old(key: str, schedule: Callable[[TrainConfig, float], float]) -> float:
        finished = epoch >= before.epochs and last is not None and key in last
        return last[key] if finished else schedule(before, epoch)

    if before.epochs == after.epochs:
        return None
    moved = []
    if after.lr_schedule == "cosine":
        was, now = old("lr", learning_rate), learning_rate(after, epoch)
        if not math.isclose(was, now, rel_tol=1e-3):
            moved.append(f"the learning rate goes from {was:.3g} to {now:.3g}")
    if after.kl_cycles > 0:
        was, now = old("beta", kl_weight), kl_weight(after, epoch)
        cycles = (f"the KL cycles last {after.epochs / after.kl_cycles:.3g} epochs "
                  f"(were {before.epochs / before.kl_cycles:.3g})")
        if not math.isclose(was, now, rel_tol=1e-3, abs_tol=1e-9):
            cycles += f" and the KL weight goes from {was:.3g} to {now:.3g}"
        moved.append(cycles)
    if not moved:
        return None
    return (f"note: --epochs {after.epochs} (was {before.epochs}) spreads the run's schedule over the new length: "
            f"after epoch {epoch}, " + "; ".join(moved))
