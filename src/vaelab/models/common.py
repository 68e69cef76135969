"""Pieces every model shares: the forward-pass output, and decoder body + likelihood head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution, Independent, kl_divergence

from ..likelihoods import build_likelihood
from ..nets import DECODERS


@dataclass
class Output:
    """One forward pass. Shapes: z is (B, D), or (K, B, D) with k importance samples per example.

    qz:   posterior q(z|x), batch shape (B,); None for deterministic encoders (AE, PCA)
    pz:   prior p(z); None when there is none
    z:    latent codes: samples from qz, or the deterministic code
    px_z: likelihood p(x|z), batch shape z.shape[:-1]
    k:    the number of samples when z has a leading sample dimension, else None
    score: for samples drawn by rejection (vMF), the log-density of the sampler's accepted proposals, shape
          z.shape[:-1], differentiable in the posterior's parameters with the proposals held: objectives add
          the sampler's gradient correction with it (objectives.sampler_correction); else None

    Objectives read a pass only through the methods below, so a model with another latent structure
    (a hierarchy of groups) returns its own Output with the same methods.
    """

    qz: Distribution | None
    pz: Distribution | None
    z: torch.Tensor
    px_z: Distribution
    k: int | None = None
    score: torch.Tensor | None = None

    def log_px_z(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) at the samples: (B,) or (K, B)."""
        return self.px_z.log_prob(x)

    def log_pz(self) -> torch.Tensor:
        """log p(z) at the samples: (B,) or (K, B)."""
        return self.pz.log_prob(self.z)

    def log_qz(self) -> torch.Tensor:
        """log q(z|x) at the samples: (B,) or (K, B)."""
        return self.qz.log_prob(self.z)

    def kl_units(self) -> torch.Tensor:
        """Analytic KL(q || p) per latent unit, (B, U): per dimension of a factorised posterior, else one unit."""
        qz, pz = self.qz, self.pz
        if isinstance(qz, Independent) and isinstance(pz, Independent) and qz.reinterpreted_batch_ndims == 1:
            return kl_divergence(qz.base_dist, pz.base_dist)  # (B, D)
        return kl_divergence(qz, pz).unsqueeze(-1)  # (B, 1)

    def kl(self) -> torch.Tensor:
        """Analytic KL(q(z|x) || p(z)) per example, (B,)."""
        return kl_divergence(self.qz, self.pz)


class ImageDecoder(nn.Module):
    """z (..., D) -> p(x|z) over images (C, H, W): a decoder body, then a likelihood head."""

    def __init__(self, *, net: str, latent_dim: int, hidden: tuple[int, ...], output_shape: tuple[int, int, int],
                 likelihood: str, sigma: float, linear: bool = False, activation: str = "relu"):
        super().__init__()
        self.latent_dim = latent_dim
        self.output_shape = tuple(output_shape)
        self.body = DECODERS[net](latent_dim=latent_dim, hidden=hidden, output_shape=self.output_shape,
                                  linear=linear, activation=activation)
        self.likelihood = build_likelihood(likelihood, sigma=sigma, channels=self.output_shape[0])

    def forward(self, z: torch.Tensor) -> Distribution:
        lead = z.shape[:-1]
        params = self.body(z.reshape(-1, self.latent_dim))  # conv bodies need exactly one batch dim
        return self.likelihood(params.reshape(*lead, *self.output_shape))
