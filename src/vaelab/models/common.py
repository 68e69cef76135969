"""Pieces every model shares: the forward-pass output, decoder body + likelihood head, and input checks."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution, Independent, kl_divergence

from ..data.dataset import check_finite
from ..errors import InputError
from ..likelihoods import build_likelihood, check_pixel_values
from ..nets import DECODERS
from ..system import model_tensor


def _check_like(t: torch.Tensor, name: str, like: torch.Tensor | None, method: str) -> None:
    """Refuse a float tensor of another dtype or on another device than the model's weights (like)."""
    if like is None:
        return
    if t.dtype != like.dtype:  # e.g. float64 from numpy against float32 weights
        raise InputError(f"{method}: {name} has dtype {t.dtype}, but this model's weights are {like.dtype}: pass "
                         f"{name}.to({like.dtype}) (or convert the model, e.g. model.to({t.dtype}))")
    if t.device != like.device:
        raise InputError(f"{method}: {name} is on {t.device}, but this model is on {like.device}: pass "
                         f"{name}.to('{like.device}') (or move the model)")


def check_images(x: torch.Tensor, shape: tuple[int, ...], method: str, model: nn.Module) -> None:
    """Refuse anything but a float batch (B, *shape) of images, with a message that says what the model takes;
    also one of another dtype or on another device than its weights, and (in eval mode: a
    user's call, where training batches come checked from their data set) values its likelihood cannot score:
    NaN or infinite ones, and for a Bernoulli likelihood values outside [0, 1] (x * 255 was encoded and scored
    without a word, log p(x|z) above 0).

    Public model methods call it first, so a wrong tensor fails here, by name, not deep inside a layer.
    """
    want = f"(B, {', '.join(map(str, shape))})"
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{method}: x must be a torch.Tensor of shape {want}, got {type(x).__name__}")
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        size = math.prod(shape)
        given, channels = tuple(x.shape), shape[0]
        hint = ("one image: x[None]" if given == tuple(shape) else
                f"flattened images: x.view(-1, {', '.join(map(str, shape))})" if x.dim() == 2 and x.shape[1] == size
                else "one grey image: x[None, None]" if channels == 1 and given == tuple(shape[1:])
                else "grey images without their channel axis: x[:, None]" if channels == 1 and given[1:] == shape[1:]
                else "channels-last images: x.permute(0, 3, 1, 2)" if given[1:] == (*shape[1:], channels)
                else "images of another size: resize them first; another data set: train on it")
        raise InputError(f"{method}: x has shape {tuple(x.shape)}, but this model takes image batches {want} ({hint})")
    if not x.is_floating_point():
        raise InputError(f"{method}: x has dtype {x.dtype}; pass floating-point pixels in [0, 1] "
                         "(e.g. x.float() / 255)")
    _check_like(x, "x", model_tensor(model), method)
    if not model.training:
        check_pixel_values(x, method, unit_interval=needs_unit_interval(model))


def needs_unit_interval(model: nn.Module) -> bool:
    """Whether the model's likelihood is a Bernoulli one, which scores values in [0, 1] only."""
    return any(getattr(m, "needs_unit_interval", False) for m in model.modules())


def no_prior(what: str) -> str:
    """Why `what` (PCA, an autoencoder) gives no samples, and the fix: the Python API's, `vaelab sample`'s and the
    explorer's one wording."""
    return f"{what} has no prior p(z); train a VAE (--model vae) to sample"


class NoPrior:
    """prior() and sample() of the models with a deterministic code (PCA, autoencoders): one line that says there is
    no prior p(z) to sample from (they raised AttributeError)."""

    def prior(self) -> Distribution:
        raise InputError(f"prior: {no_prior(type(self).__name__)}")

    def sample(self, n: int, *, mean: bool = True) -> torch.Tensor:
        raise InputError(f"sample: {no_prior(type(self).__name__)}")


def has_prior(model: nn.Module) -> bool:
    """Whether the model has a prior p(z), and so prior() and sample(): PCA and autoencoders have the methods only to
    refuse them (NoPrior's)."""
    return hasattr(model, "prior") and not isinstance(model, NoPrior)


def check_codes(z: torch.Tensor, latent_dim: int, method: str, model: nn.Module) -> None:
    """Refuse anything but float codes (..., latent_dim); also codes of another dtype or on another
    device than its weights, and (in eval mode, as check_images) NaN or infinite ones: decode turned them into
    NaN images without a word.

    Models decode codes of their own making (forward, reconstruct) without it: an encoder's codes need no check.
    """
    if not isinstance(z, torch.Tensor):
        raise InputError(f"{method}: z must be a torch.Tensor of shape (..., {latent_dim}), got {type(z).__name__}")
    if z.dim() == 0 or z.shape[-1] != latent_dim:
        raise InputError(f"{method}: z has shape {tuple(z.shape)}, but this model's codes have {latent_dim} "
                         f"dimensions: (..., {latent_dim})")
    if not z.is_floating_point():
        raise InputError(f"{method}: z has dtype {z.dtype}; pass floating-point codes (e.g. z.float())")
    _check_like(z, "z", model_tensor(model), method)
    if not model.training:
        check_finite(z, f"{method}: z", error=InputError, fix="pass finite codes")


def check_tokens(x: torch.Tensor, vocab_size: int, method: str, *, values: bool = True) -> torch.Tensor:
    """x as int64 token ids (B, T), T >= 1; anything else, and (with values) ids outside the vocabulary, refused.

    Integer ids of other dtypes are taken (int32 from NumPy failed in cross_entropy, int16 in the embedding, and
    uint8 ids were checked in uint8 arithmetic: 7981 wrapped to 45). The value check reads x (a device sync on a
    GPU); text models skip it for training batches, whose ids come from the data set's own vocabulary.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{method}: x must be a torch.Tensor of token ids (B, T), got {type(x).__name__}")
    if x.dim() != 2:
        raise InputError(f"{method}: x has shape {tuple(x.shape)}, but this model takes token batches (B, T) "
                         "(one sentence: x[None])")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise InputError(f"{method}: x has dtype {x.dtype}; pass integer token ids (vaelab.data.text.text_to_tokens)")
    if x.shape[1] == 0:
        raise InputError(f"{method}: x has shape {tuple(x.shape)}: sentences of no tokens; each needs at least its "
                         "<eos> (vaelab.data.text.text_to_tokens)")
    x = x if x.dtype == torch.int64 else x.long()  # (a no-op .long() split torch.compile's graph)
    if values and x.numel() and not bool(((x >= 0) & (x < vocab_size)).all()):
        raise InputError(f"{method}: x holds token ids outside this model's vocabulary (0..{vocab_size - 1})")
    return x


def check_count(n: int, method: str, name: str = "n", *, of: str = "samples", least: int = 0) -> int:
    """n as a whole number >= least, or an InputError naming the argument."""
    try:
        count = operator.index(n)  # ints and integer-like (numpy) scalars, not floats or bools' surprises
    except TypeError:
        raise InputError(f"{method}: {name} must be a whole number of {of}, got {n!r}") from None
    if isinstance(n, bool) or count < least:
        raise InputError(f"{method}: {name} must be a whole number >= {least}, got {n!r}")
    return count


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
        if z.dim() == 2:  # (B, D): what the bodies take and give back as (B, C, H, W)
            return self.likelihood(self.body(z))
        lead = z.shape[:-1]
        params = self.body(z.reshape(-1, self.latent_dim))  # conv bodies need exactly one batch dim
        return self.likelihood(params.reshape(*lead, *self.output_shape))
