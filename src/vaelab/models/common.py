"""Pieces every model shares: the forward-pass output, and decoder body + likelihood head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution

from ..likelihoods import build_likelihood
from ..nets import DECODERS


@dataclass
class Output:
    """One forward pass. Shapes: z is (B, D), or (K, B, D) with K importance samples.

    qz:   posterior q(z|x), batch shape (B,); None for deterministic encoders (AE, PCA)
    pz:   prior p(z); None when there is none
    z:    latent codes: samples from qz, or the deterministic code
    px_z: likelihood p(x|z), batch shape z.shape[:-1]
    """

    qz: Distribution | None
    pz: Distribution | None
    z: torch.Tensor
    px_z: Distribution


class ImageDecoder(nn.Module):
    """z (..., D) -> p(x|z) over images (C, H, W): a decoder body, then a likelihood head."""

    def __init__(self, *, net: str, latent_dim: int, hidden: tuple[int, ...], output_shape: tuple[int, int, int],
                 likelihood: str, sigma: float, linear: bool = False):
        super().__init__()
        self.latent_dim = latent_dim
        self.output_shape = tuple(output_shape)
        self.body = DECODERS[net](latent_dim=latent_dim, hidden=hidden, output_shape=self.output_shape,
                                  linear=linear)
        self.likelihood = build_likelihood(likelihood, sigma=sigma, channels=self.output_shape[0])

    def forward(self, z: torch.Tensor) -> Distribution:
        lead = z.shape[:-1]
        params = self.body(z.reshape(-1, self.latent_dim))  # conv bodies need exactly one batch dim
        return self.likelihood(params.reshape(*lead, *self.output_shape))
