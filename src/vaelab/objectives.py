"""Training objectives: pure functions of a forward pass and the data, returning per-example terms.

Every function returns a dict of (B,) tensors: "loss" (minimised), "recon" (-log p(x|z)) and "kl".
Weights that schedules change during training (beta) are arguments; objectives know no epochs.
"""
from __future__ import annotations

import torch
from torch.distributions import kl_divergence

from .models import Output


def elbo(out: Output, x: torch.Tensor, *, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """Negative ELBO with a KL weight: -E_q[log p(x|z)] + beta * KL(q(z|x) || p(z)).

    One reparameterised sample per example estimates the reconstruction term; the KL is analytic
    (Kingma & Welling 2014, eq. 10). beta != 1 is the beta-VAE of Higgins et al. 2017.
    """
    recon = -out.px_z.log_prob(x)  # (B,)
    kl = kl_divergence(out.qz, out.pz)  # (B,)
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl}


def reconstruction(out: Output, x: torch.Tensor, *, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """-log p(x|z) at the deterministic code z = f(x): the autoencoder's loss (beta is unused)."""
    recon = -out.px_z.log_prob(x)  # (B,)
    return {"loss": recon, "recon": recon, "kl": torch.zeros_like(recon)}


OBJECTIVES = {"elbo": elbo}
