"""Latent families: a posterior head q(z|x) and its prior p(z), both torch.distributions objects.

The KL between them comes from `torch.distributions.kl_divergence`, analytic where registered.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

# Numerics in one place: log-variances outside this range only arise from diverging training,
# and exp() of them would overflow or underflow float32.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class Noise(Protocol):
    """A source of standard normal noise of a requested (K, B, ...) shape, e.g. keyed by example and sample."""

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor: ...


def diagonal_normal(loc: torch.Tensor, scale: torch.Tensor) -> Distribution:
    """N(loc, diag(scale^2)) over the last dimension, as one event."""
    return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


class DiagonalGaussian(nn.Module):
    """q(z|x) = N(mu(x), diag(sigma^2(x))) with mean and log-variance heads; prior p(z) = N(0, I).

    Kingma & Welling 2014, "Auto-Encoding Variational Bayes", Sec. 3 and Appendix C.2.
    """

    def __init__(self, *, in_features: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.mean = nn.Linear(in_features, latent_dim)
        self.logvar = nn.Linear(in_features, latent_dim)
        self.register_buffer("zero", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("one", torch.ones(latent_dim), persistent=False)

    def forward(self, h: torch.Tensor) -> Distribution:
        """Posterior from encoder features h (B, F); batch shape (B,), event shape (D,)."""
        logvar = self.logvar(h).clamp(LOGVAR_MIN, LOGVAR_MAX)
        return diagonal_normal(self.mean(h), torch.exp(0.5 * logvar))

    def prior(self) -> Distribution:
        """p(z) = N(0, I); batch shape (), event shape (D,)."""
        return diagonal_normal(self.zero, self.one)

    @staticmethod
    def rsample(qz: Distribution, k: int | None = None, noise: Noise | None = None) -> torch.Tensor:
        """Reparameterised z = mu + sigma * eps: (B, D), or (K, B, D) with k; eps from `noise` when given."""
        if noise is None:
            return qz.rsample() if k is None else qz.rsample((k,))
        base = qz.base_dist
        eps = noise.normal(((1 if k is None else k), *base.loc.shape))  # (K, B, D)
        z = base.loc + base.scale * eps.to(base.loc)
        return z[0] if k is None else z


LATENTS = {"gaussian": DiagonalGaussian}
