"""Schedules over a run's epochs: the KL weight (warm-up, cyclical annealing) and the learning rate (cosine).

Each is a function of the fractional epoch the step is at, so a resumed run recomputes it exactly.
"""
from __future__ import annotations

import math

from .config import TrainConfig


def kl_weight(config: TrainConfig, progress_epochs: float) -> float:
    """The KL weight after `progress_epochs` (fractional) epochs of training.

    Linear warm-up: beta * min(1, t / warmup) (Bowman et al. 2016; Sonderby et al. 2016). Cyclical
    annealing: the run splits into kl_cycles equal cycles, and in each the weight rises linearly from 0
    to beta over the first kl_cycle_ratio of it, then holds (Fu et al. 2019, eq. 3).
    """
    if config.kl_cycles > 0:
        period = config.epochs / config.kl_cycles
        phase = (progress_epochs % period) / period
        return config.beta * min(1.0, phase / config.kl_cycle_ratio)
    if config.warmup_epochs <= 0:
        return config.beta
    return config.beta * min(1.0, progress_epochs / config.warmup_epochs)


def cosine_rate(peak: float, floor: float, fraction: float) -> float:
    """floor + (peak - floor) (1 + cos(pi t)) / 2 at t = fraction of the run, clamped to [0, 1].

    Cosine annealing without restarts (Loshchilov & Hutter 2017, "SGDR", eq. 5), as NVAE anneals its rate.
    """
    t = min(1.0, max(0.0, fraction))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * t))


def learning_rate(config: TrainConfig, progress_epochs: float) -> float:
    """The rate after `progress_epochs` (fractional) epochs: lr, or its cosine annealing over config.epochs.

    A --resume that extends --epochs stretches the rest of the cosine over the new length.
    """
    if config.lr_schedule == "cosine" and config.epochs > 0:
        return cosine_rate(config.lr, config.lr_min, progress_epochs / config.epochs)
    return config.lr
