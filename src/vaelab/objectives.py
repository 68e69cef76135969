"""Training objectives: pure functions of a forward pass and the data, returning per-example terms.

Every function returns a dict of (B,) tensors: "loss" (minimised), "recon" (-log p(x|z)) and "kl".
Weights that schedules change during training (beta) are arguments; objectives know no epochs.
Shapes: with K samples per example, z is (K, B, D) and log-densities of z are (K, B).
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .models import Output
from .models.hvae import kl_balance_coefficients


def _log_terms(out: Output, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x|z) and log p(z) - log q(z|x) at the samples z: (B,), or (K, B) with K samples."""
    return out.log_px_z(x), out.log_pz() - out.log_qz()


def _per_example(t: torch.Tensor) -> torch.Tensor:
    """Per-example terms are (B,); one computed at K samples, (K, B), is averaged over them."""
    return t.mean(0) if t.dim() > 1 else t


def _leave_one_out_mean(f: torch.Tensor, dim: int) -> torch.Tensor:
    """Each entry's baseline: the mean of the others along dim (zero when it is alone)."""
    n = f.shape[dim]
    return (f.sum(dim, keepdim=True) - f) / (n - 1) if n > 1 else torch.zeros_like(f)


def sampler_correction(f: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """A term of value 0 whose gradient is the rejection sampler's correction to E_q[f]'s gradient.

    For z drawn by acceptance-rejection (the vMF's w), d E[f(z)] = E[d f(z)] + E[f(z) d log pi(eps)]
    (Naesseth et al. 2017, eq. 8: g_rep + g_cor); autograd gives the first through z, and this term, with
    score = log pi(eps) of the accepted proposals (Output.score, same shape as f), the second:
    (f - b) * (score - score.detach()), f and b detached. The baseline b is the mean of f over the
    example's other samples, or with one sample over the other examples: independent of the draw, so the
    estimate stays unbiased (E[d log pi] = 0) while the variance drops.
    """
    if not score.requires_grad:
        return torch.zeros_like(f)
    f = f.detach()
    baseline = _leave_one_out_mean(f, 0 if f.dim() == 1 or f.shape[0] > 1 else 1)
    return (f - baseline) * (score - score.detach())


def log_weights(out: Output, x: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """Log importance weights log p(x|z) + beta * (log p(z) - log q(z|x)), shape z.shape[:-1].

    With beta = 1 these are log p(x, z) - log q(z|x), whose log-mean-exp over samples is the IWAE bound.
    """
    log_px_z, log_ratio = _log_terms(out, x)
    return log_px_z + beta * log_ratio


def elbo(out: Output, x: torch.Tensor, *, beta: float = 1.0, free_bits: float = 0.0, kl_balance: bool = False,
         kl: str = "analytic") -> dict[str, torch.Tensor]:
    """Negative ELBO with a KL weight: -E_q[log p(x|z)] + beta * KL(q(z|x) || p(z)).

    Reparameterised samples (one, or K averaged) estimate the reconstruction term; the KL is analytic
    (Kingma & Welling 2014, eq. 10), or with kl="mc" the Monte Carlo estimate log q(z|x) - log p(z)
    on the same samples (their eq. 6, the estimator L^A; eq. 7 is L^B, with the analytic KL).
    beta != 1 is the beta-VAE of Higgins et al. 2017.
    free_bits > 0 charges each latent unit's KL, averaged over the batch, at least free_bits nats
    (Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow", eq. 15);
    the "kl" term returned stays the true KL. For a hierarchy the units are its latent groups.
    kl_balance (hierarchies): while beta < 1, charge sum_l gamma_l KL_l with NVAE's balancing
    coefficients (Vahdat & Kautz 2020, Appendix A) in place of the KL.
    With z from a rejection sampler (vMF latents: out.score), the loss also carries the sampler's gradient
    correction (sampler_correction), whose value is 0.
    """
    log_ratio = None
    if kl == "analytic":
        log_px_z, kl_term = out.log_px_z(x), out.kl()
    else:
        log_px_z, log_ratio = _log_terms(out, x)
        kl_term = -log_ratio
    recon, kl_term = -_per_example(log_px_z), _per_example(kl_term)
    charged = kl_term if free_bits <= 0 else _free_bits_kl(out, free_bits)
    if kl_balance and isinstance(beta, torch.Tensor):  # a compiled step's beta: no data-dependent branch (a graph
        charged = torch.where(beta < 1, _balanced_kl(out), charged)  # break per step under torch.compile)
    elif kl_balance and beta < 1:
        charged = _balanced_kl(out)
    loss = recon + (charged if isinstance(beta, (int, float)) and beta == 1 else beta * charged)  # (one op fewer)
    score = out.score
    if score is not None:  # z was rejection-sampled (vMF): add the sampler's gradient correction
        # what the loss takes the expectation of over z: log p(x|z), and the KL when it is estimated from z
        f = log_px_z + beta * log_ratio if log_ratio is not None and charged is kl_term else log_px_z
        loss = loss - _per_example(sampler_correction(f, score))
    return {"loss": loss, "recon": recon, "kl": kl_term}


def _free_bits_kl(out: Output, free_bits: float) -> torch.Tensor:
    """Per-example KL in which units whose batch-mean KL is below free_bits are charged free_bits instead.

    Averaged over the batch this is sum_u max(free_bits, mean_b KL_bu); units under the floor get no gradient.
    """
    units = out.kl_units()  # (B, U), or (K, B, U) when it depends on the samples
    units = units.mean(0) if units.dim() > 2 else units
    floor = units.new_tensor(free_bits)
    return torch.where(units.mean(0) >= free_bits, units, floor).sum(-1)


def check_free_bits(free_bits: float, examples: int) -> None:
    """Refuse a free-bits floor above log N nats for N training examples: a latent unit carries at most log N nats
    about which example it encodes (E_x KL(q(z_u|x) || p(z_u)) >= I(x; z_u) and I(x; z_u) <= H(x) = log N), so
    under such a floor it would hold all of that without a KL charge, and the KL term would never limit the code
    (--free-bits 1e6 trained an autoencoder with noisy codes without a word)."""
    most = math.log(max(examples, 1))
    if free_bits > most:
        raise ConfigError(f"--free-bits {free_bits:g} is above log N = {most:.3g} nats for the N = {examples} training "
                          f"examples: a latent unit tells at most log N nats about which example it encodes, so the "
                          f"KL term would never act; use a floor below {most:.3g} (0.1-2 nats is usual), or "
                          f"--beta 0 for no KL term")


def _balanced_kl(out: Output) -> torch.Tensor:
    """sum_l gamma_l KL_l per example, gamma from the batch (detached, mean 1): NVAE's balanced KL term."""
    sizes = getattr(out, "group_sizes", None)
    if sizes is None:
        raise ValueError("KL balancing needs a hierarchy of latent groups (a pass of --model hvae)")
    units = out.kl_units()  # (B, L) or (K, B, L)
    units = units.mean(0) if units.dim() > 2 else units
    return (units * kl_balance_coefficients(units, sizes)).sum(-1)


def iwae(out: Output, x: torch.Tensor, *, beta: float = 1.0, free_bits: float = 0.0,
         kl_balance: bool = False) -> dict[str, torch.Tensor]:
    """Negative IWAE bound: -log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016, eq. 8).

    Needs out.z of shape (K, B, D) (the model run with k=K). With K = 1 it equals the single-sample
    ELBO with the Monte Carlo KL, elbo(kl="mc"), exactly (gradients too, the vMF's sampler correction included).
    recon and kl are reported as sample means.
    """
    if out.k is None:
        raise ValueError("iwae needs K samples per example: call the model with k=K")
    if free_bits or kl_balance:
        raise ValueError("free bits and KL balancing apply to the ELBO's KL term, not to the IWAE bound")
    log_px_z, log_ratio = _log_terms(out, x)  # (K, B) each
    log_w = log_px_z + beta * log_ratio
    bound = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    loss = -bound
    score = out.score
    if score is not None:  # the bound is one function of the K draws: their scores add up
        loss = loss - sampler_correction(bound, score.sum(0))
    return {"loss": loss, "recon": -log_px_z.mean(0), "kl": -log_ratio.mean(0)}


def reconstruction(out: Output, x: torch.Tensor, *, beta: float = 1.0, free_bits: float = 0.0,
                   kl_balance: bool = False) -> dict[str, torch.Tensor]:
    """-log p(x|z) at the deterministic code z = f(x): the autoencoder's loss (beta, free_bits, kl_balance unused)."""
    recon = -out.log_px_z(x)  # (B,)
    return {"loss": recon, "recon": recon, "kl": torch.zeros_like(recon)}


OBJECTIVES = {"elbo": elbo, "iwae": iwae}
