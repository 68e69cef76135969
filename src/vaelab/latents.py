"""Latent families: a posterior head q(z|x) and its prior p(z), both torch.distributions objects.

The KL between them comes from `torch.distributions.kl_divergence`, analytic where registered.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, register_kl

from .errors import InputError
from .linear import Linear

# Numerics in one place: log-variances outside this range only arise from diverging training; inside it sigma^2,
# 1/sigma^2 and the KL's gradients stay far from float32's limits (exp overflows at 88). The clamp passes gradients
# through (straight-through): a hard clamp's zero gradient left a unit past a bound there for good.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
BN_EPS = 1e-12  # BN-VAE normalisation of the posterior means: see DiagonalGaussian


class Noise(Protocol):
    """A source of standard normal noise of a requested (K, B, ...) shape, e.g. keyed by example and sample."""

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor: ...


class DiagonalNormal(Independent):
    """N(loc, diag(scale^2)) over the last dimension, as one event; it keeps log(scale^2) when one is given.

    An Independent(Normal) in every respect; the log-variance only feeds the KL against StandardNormal.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, logvar: torch.Tensor | None = None):
        super().__init__(Normal(loc, scale, validate_args=False), 1, validate_args=False)
        self.logvar = logvar

    def pairwise_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q_j(z_i) for codes z (M, D) under each distribution j of a batch (N,): (M, N), in float64.

        sum_d (z_id - mu_jd)^2 / sigma_jd^2 expanded into three (M, D) x (D, N) products, where log_prob
        of z[:, None] builds (M, N, D) temporaries: for the mutual-information bounds of a 100,000-dimensional
        latent over its test codes, ~2 minutes of a report.
        """
        loc, scale = self.base_dist.loc.double(), self.base_dist.scale.double()
        precision = scale.pow(-2)
        z = z.double()
        quadratic = z.pow(2) @ precision.T - 2 * z @ (loc * precision).T + (loc.pow(2) * precision).sum(-1)
        return -0.5 * quadratic - scale.log().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalNormal, _instance)
        shape = torch.Size(batch_shape) + self.event_shape
        new.logvar = None if self.logvar is None else self.logvar.expand(shape)
        return super().expand(batch_shape, _instance=new)


class StandardNormal(DiagonalNormal):
    """The prior N(0, I) over the last dimension; build it with standard_normal."""


def diagonal_normal(loc: torch.Tensor, scale: torch.Tensor, logvar: torch.Tensor | None = None) -> DiagonalNormal:
    """N(loc, diag(scale^2)) over the last dimension, as one event (logvar: log(scale^2), if at hand)."""
    return DiagonalNormal(loc, scale, logvar)


def standard_normal(zero: torch.Tensor, one: torch.Tensor) -> StandardNormal:
    """N(0, I) over the last dimension from zero and one vectors (buffers, so it follows the model's device)."""
    return StandardNormal(zero, one)


@register_kl(DiagonalNormal, StandardNormal)
def _kl_diagonal_standard(q: DiagonalNormal, p: StandardNormal) -> torch.Tensor:
    """KL(N(mu, diag(sigma^2)) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2) (Kingma & Welling 2014,
    Appendix B), from the stored log-variance: 7 ops where torch's Normal-Normal KL takes 11 (training steps
    of the MLP VAE ~3% faster)."""
    logvar = q.logvar if q.logvar is not None else 2 * q.base_dist.scale.log()
    return 0.5 * (q.base_dist.loc.pow(2) + logvar.exp() - 1 - logvar).sum(-1)


class DiagonalGaussian(nn.Module):
    """q(z|x) = N(mu(x), diag(sigma^2(x))) with mean and log-variance heads; prior p(z) = N(0, I).

    Kingma & Welling 2014, "Auto-Encoding Variational Bayes", Sec. 3 and Appendix C.2.
    """

    def __init__(self, *, in_features: int, latent_dim: int, bn_mu: float | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.mean = Linear(in_features, latent_dim)
        self.logvar = Linear(in_features, latent_dim)
        self.register_buffer("zero", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("one", torch.ones(latent_dim), persistent=False)
        self._prior: StandardNormal | None = None
        self.mean_bn = None
        if bn_mu is not None:
            # BN-VAE (Zhu et al. 2020, Sec. 3.2): mu = gamma * BN(mu) + beta with gamma fixed and beta learned
            # keeps E[mu_d^2] >= gamma^2 over the data, so the expected KL is at least D * gamma^2 / 2.
            # The bound needs BN's eps << Var(mu). With torch's eps = 1e-5 the KL still has a gradient
            # eps / (Var + eps)^2 towards Var(mu) = 0, and Adam (which rescales small, consistent gradients to
            # full steps) follows it: a text VAE's encoder made its states constant within 100 steps and the KL
            # fell to 0.002 (the paper trains with SGD). At eps = 1e-12 that pull vanishes (it only guards 0/0).
            self.mean_bn = nn.BatchNorm1d(latent_dim, affine=False, eps=BN_EPS)
            self.register_buffer("bn_gamma", torch.tensor(float(bn_mu)))
            self.bn_beta = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, h: torch.Tensor) -> Distribution:
        """Posterior from encoder features h (B, F); batch shape (B,), event shape (D,)."""
        raw = self.logvar(h)
        held = raw.detach()  # (the correction computed off the graph: two ops fewer to record)
        logvar = raw + (held.clamp(LOGVAR_MIN, LOGVAR_MAX) - held)  # the clamped value, raw's gradient
        mu = self.mean(h)
        if self.mean_bn is not None:
            if self.training and mu.shape[0] < 2:
                raise InputError("a BN-VAE in training mode batch-normalises posterior means over the batch, which "
                                 f"needs at least 2 examples, got {mu.shape[0]}; call model.eval() to encode one")
            mu = self.bn_gamma * self.mean_bn(mu) + self.bn_beta
        return diagonal_normal(mu, torch.exp(0.5 * logvar), logvar)

    def prior(self) -> Distribution:
        """p(z) = N(0, I); batch shape (), event shape (D,).

        Every forward pass asks for it, so it is made once and kept while the buffers it is built from stay
        (moving or converting the model replaces them, and so the prior); one made while torch.compile traces
        is not kept.
        """
        prior = self._prior
        if prior is None or prior.base_dist.loc is not self.zero or prior.base_dist.scale is not self.one:
            prior = standard_normal(self.zero, self.one)
            if not torch.compiler.is_compiling():
                self._prior = prior
        return prior

    @staticmethod
    def rsample(qz: Distribution, k: int | None = None, noise: Noise | None = None) -> torch.Tensor:
        """Reparameterised z = mu + sigma * eps: (B, D), or (K, B, D) with k; eps from `noise` when given."""
        if noise is None:
            return qz.rsample() if k is None else qz.rsample((k,))
        base = qz.base_dist
        eps = noise.normal(((1 if k is None else k), *base.loc.shape))  # (K, B, D)
        z = base.loc + base.scale * eps.to(base.loc)
        return z[0] if k is None else z

    @staticmethod
    def rsample_and_score(qz: Distribution, k: int | None = None,
                          noise: Noise | None = None) -> tuple[torch.Tensor, None]:
        """rsample's z, and no sampler score: the reparameterisation gradient is the whole gradient."""
        return DiagonalGaussian.rsample(qz, k, noise), None


def build_latent(name: str, *, in_features: int, latent_dim: int, kappa: float | None = None,
                 bn_mu: float | None = None) -> nn.Module:
    """The posterior head and prior of a --latent family."""
    if name == "vmf":
        from .vmf import VMFLatent  # the Bessel-function machinery loads only when asked for

        return VMFLatent(in_features=in_features, latent_dim=latent_dim, kappa=kappa)
    return DiagonalGaussian(in_features=in_features, latent_dim=latent_dim, bn_mu=bn_mu)
