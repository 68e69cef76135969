"""A deep hierarchical VAE in the style of NVAE (Vahdat & Kautz 2020), sized down for small images on a CPU.

Generative model over L spatial latent groups z_1 .. z_L (z_l is (C_z, h_l, w_l) at its scale), top-down:

    p(x, z) = p(z_1) prod_{l>1} p(z_l | z_<l) p(x | z),      p(z_1) = N(0, I)

Inference shares the top-down path (bidirectional inference: Kingma et al. 2016, Sec. 6; NVAE Sec. 3.1):

    q(z|x) = q(z_1 | x) prod_{l>1} q(z_l | x, z_<l)

with each posterior parameterised relative to its prior (NVAE Sec. 3.2, eq. 2). Group 1's prior is N(0, I),
as in NVAE's code, so a single group is a convolutional VAE with a standard normal prior.

Shapes: B examples, K samples each. Bottom-up features are computed once, (B, c, h, w); the top-down state of
K samples is flattened to (K*B, c, h, w), and distributions over z_l have batch shape (K, B), or (B,) without K.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from ..errors import ConfigError
from ..hvae_cells import ResidualCell, SpectralNorms, scale_sizes
from ..latents import Noise, diagonal_normal
from ..likelihoods import build_likelihood

KL_BALANCE_EPS = 0.01  # NVAE's kl_per_group adds 0.01: a collapsed group keeps a small, nonzero coefficient


def spatial_normal(loc: torch.Tensor, scale: torch.Tensor) -> Distribution:
    """N(loc, diag(scale^2)) with the last three dimensions (C, h, w) as one event."""
    return Independent(Normal(loc, scale, validate_args=False), 3, validate_args=False)


def soft_scale(raw: torch.Tensor, floor: float) -> torch.Tensor:
    """softplus(raw + c), shifted so that raw = 0 gives 1 - floor: a scale that adding `floor` makes 1."""
    return F.softplus(raw + math.log(math.expm1(1.0 - floor)))


class Group(NamedTuple):
    """One latent group of a pass: posterior (None when generating), prior, and the sample z_l."""

    qz: Distribution | None
    pz: Distribution
    z: torch.Tensor  # (B, C, h, w), or (K, B, C, h, w)


@dataclass
class HierarchicalOutput:
    """One forward pass of the hierarchy; objectives read it through the same methods as models.Output.

    The KL of group l is taken at the sampled z_<l, so it is (K, B) whenever K samples were drawn.
    """

    groups: list[Group]
    px_z: Distribution
    k: int | None = None

    def log_px_z(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) at the samples: (B,) or (K, B)."""
        return self.px_z.log_prob(x)

    def log_pz(self) -> torch.Tensor:
        """log p(z) = sum_l log p(z_l | z_<l): (B,) or (K, B)."""
        return sum(g.pz.log_prob(g.z) for g in self.groups)

    def log_qz(self) -> torch.Tensor:
        """log q(z|x) = sum_l log q(z_l | x, z_<l): (B,) or (K, B)."""
        return sum(g.qz.log_prob(g.z) for g in self.groups)

    def kl_units(self) -> torch.Tensor:
        """Analytic KL(q_l || p_l) per group at the sampled z_<l, (B, L) or (K, B, L)."""
        kls = [kl_divergence(g.qz, g.pz) for g in self.groups]  # group 1's is (B,) even with K samples
        shape = torch.broadcast_shapes(*(kl.shape for kl in kls))
        return torch.stack([kl.expand(shape) for kl in kls], -1)

    def kl(self) -> torch.Tensor:
        """sum_l KL(q(z_l | x, z_<l) || p(z_l | z_<l)): the hierarchy's KL term (NVAE eq. 1), (B,) or (K, B)."""
        return self.kl_units().sum(-1)


def kl_balance_coefficients(kl_units: torch.Tensor, group_sizes: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """NVAE's KL balancing coefficients gamma (L,), detached, with mean 1 (Appendix A; their code's kl_balancer).

        gamma_l  proportional to  (mean_batch |KL_l| + 0.01) / s_l,   then  gamma <- gamma / mean(gamma)

    Groups that carry little KL per latent unit get a small coefficient, which lets them take up more
    information during KL warm-up; use sum_l gamma_l KL_l in place of the KL only while beta < 1. The paper's
    text says "proportional to the size s_l", a typo: NVAE's code divides by s_l, and the first author
    confirms the division (NVlabs/NVAE issue #26).

    Args:
        kl_units: per-group KLs, (B, L) or (K, B, L), e.g. HierarchicalOutput.kl_units().
        group_sizes: s_l, the number of latent units of each group (HVAE.group_sizes).
    """
    units = kl_units.detach().reshape(-1, kl_units.shape[-1])  # (K*B, L)
    sizes = torch.as_tensor(group_sizes, dtype=units.dtype, device=units.device)
    gamma = (units.abs().mean(0) + KL_BALANCE_EPS) / sizes
    return gamma / gamma.mean()


class HVAE(nn.Module):
    """NVAE-style hierarchical VAE: residual bottom-up encoder, shared top-down path, spatial latent groups.

    Args:
        input_shape: (C, H, W) of the images.
        latent_dim: channels of each latent group.
        hidden: channels per spatial scale, scale s at resolution ceil(H / 2^(s+1)); e.g. (32, 64).
        groups: latent groups per scale, top (coarsest) scale first; as many entries as hidden.
        likelihood: "bernoulli", "gaussian" (fixed sigma) or "gaussian-learned".
        sigma: the Gaussian likelihood's fixed (or initial) scale.
        scale_floor: every prior and posterior standard deviation is softplus(.) + scale_floor.
        cells: residual cells per group, in the encoder and in the decoder.
    """

    def __init__(self, *, input_shape: tuple[int, int, int], latent_dim: int = 8,
                 hidden: tuple[int, ...] = (32, 64), groups: tuple[int, ...] = (2, 2),
                 likelihood: str = "bernoulli", sigma: float = 0.1, scale_floor: float = 0.01, cells: int = 1):
        super().__init__()
        hidden, groups = tuple(hidden), tuple(groups)
        if len(input_shape) != 3:
            raise ConfigError(f"the hierarchical VAE models images (C, H, W), got input_shape {input_shape}")
        if not hidden or len(groups) != len(hidden) or min(groups) < 1:
            raise ConfigError(f"--groups needs one count >= 1 per scale of --hidden {hidden}, got {groups}")
        if not 0 < scale_floor < 1 or cells < 1 or latent_dim < 1:
            raise ConfigError("the hierarchical VAE needs 0 < scale_floor < 1, cells >= 1 and latent_dim >= 1")
        self.input_shape = tuple(input_shape)
        self.scale_floor, self.z_channels, self.cells = float(scale_floor), latent_dim, cells
        c, height, width = self.input_shape
        n_scales = len(hidden)
        self.sizes = scale_sizes((height, width), n_scales)
        # top-down order of the groups: coarsest scale first
        self.group_scale = [s for i, s in enumerate(reversed(range(n_scales))) for _ in range(groups[i])]
        self.group_shapes = [(latent_dim, *self.sizes[s]) for s in self.group_scale]
        self.group_sizes = [math.prod(shape) for shape in self.group_shapes]
        self.latent_dim = self.group_sizes[0]  # D_top: generic code sees the top group as "z"

        # bottom-up: stem, then per scale one block of cells per group (its output feeds that group), then down
        self.stem = nn.Conv2d(c, hidden[0], 3, stride=2, padding=1)
        self.enc = nn.ModuleList(
            nn.ModuleList(self._cells(hidden[s]) for _ in range(groups[n_scales - 1 - s])) for s in range(n_scales))
        self.down = nn.ModuleList(ResidualCell(hidden[s], hidden[s + 1], resample="down")
                                  for s in range(n_scales - 1))

        # top-down: learned constant h_0, then per group: prior, posterior, merge of z_l, cells; up between scales
        top = n_scales - 1
        self.h0 = nn.Parameter(torch.rand(hidden[top], *self.sizes[top]))  # NVAE's prior_ftr0, uniform init
        width_of = [hidden[s] for s in self.group_scale]
        self.prior_heads = nn.ModuleList(
            nn.Sequential(nn.ELU(), nn.Conv2d(ch, 2 * latent_dim, 3, padding=1)) for ch in width_of[1:])
        self.post_combine = nn.ModuleList(nn.Conv2d(ch, ch, 1) for ch in width_of[1:])  # NVAE's EncCombinerCell
        self.post_heads = nn.ModuleList(
            [nn.Sequential(nn.ELU(), nn.Conv2d(width_of[0], width_of[0], 1), nn.ELU(),  # NVAE's enc0
                           nn.Conv2d(width_of[0], 2 * latent_dim, 3, padding=1))]
            + [nn.Conv2d(ch, 2 * latent_dim, 3, padding=1) for ch in width_of[1:]])
        self.merge = nn.ModuleList(nn.Conv2d(ch + latent_dim, ch, 1) for ch in width_of)  # NVAE's DecCombinerCell
        self.dec = nn.ModuleList(self._cells(ch) for ch in width_of)
        self.up = nn.ModuleList(ResidualCell(hidden[s + 1], hidden[s], resample="up", out_size=self.sizes[s])
                                for s in range(n_scales - 1))
        # one parameter per pixel from scale 0 (H/2): sub-pixel convolution (Shi et al. 2016), cropped for odd sizes
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(hidden[0], 4 * c, 3, padding=1), nn.PixelShuffle(2))
        self.likelihood = build_likelihood(likelihood, sigma=sigma, channels=c)
        self.register_buffer("zero", torch.zeros(self.latent_dim), persistent=False)
        self.register_buffer("one", torch.ones(self.latent_dim), persistent=False)

        self._weight_names = [name for name, m in self.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        modules = dict(self.named_modules())
        self.spectral = SpectralNorms([modules[n].weight.shape for n in self._weight_names])

