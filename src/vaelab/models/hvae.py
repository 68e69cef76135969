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
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from ..config import scale_sizes, zeros_last
from ..errors import ConfigError, InputError
from ..hvae_cells import ResidualCell, SpectralNorms
from ..latents import Noise, diagonal_normal, standard_normal
from ..likelihoods import build_likelihood
from .common import check_codes, check_count, check_images

SOFTPLUS_ONE = math.log(math.expm1(1.0))  # softplus(0 + SOFTPLUS_ONE) = 1
MAX_TEMPERATURE = 10.0  # sample(temperature=t) takes 0 <= t <= this: far above, latents overflow the decoder (NaN)
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
    group_sizes: list[int] | None = None  # latent units per group, for KL balancing
    score: None = None  # Output.score: every group is reparameterised, no rejection sampler to correct

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
        groups: latent groups per scale, top (coarsest) scale first; as many entries as hidden. The finest
            scales may have 0: they hold no latents, only one block of cells each way (NVAE's pre- and
            post-processing cells, which keep its latent groups at 1/4 and 1/8 of the image size).
        likelihood: "bernoulli", "gaussian" (fixed sigma) or "gaussian-learned".
        sigma: the Gaussian likelihood's fixed (or initial) scale.
        scale_floor: every prior and posterior standard deviation is softplus(.) + scale_floor.
        cells: residual cells per group, in the encoder and in the decoder.

    Attributes: latent_dim is not the argument but D_top, the top group's size flattened (channels x height x
    width): what encode, embed and decode take and give, as for a flat VAE (z_channels keeps the argument);
    group_sizes lists every group's.
    """

    def __init__(self, *, input_shape: tuple[int, int, int], latent_dim: int = 8,
                 hidden: tuple[int, ...] = (32, 64), groups: tuple[int, ...] = (2, 2),
                 likelihood: str = "bernoulli", sigma: float = 0.1, scale_floor: float = 0.01, cells: int = 1):
        super().__init__()
        hidden, groups = tuple(hidden), tuple(groups)
        if len(input_shape) != 3:
            raise ConfigError(f"the hierarchical VAE models images (C, H, W), got input_shape {input_shape}")
        if not hidden or len(groups) != len(hidden) or min(groups) < 0 or not zeros_last(groups):
            raise ConfigError(f"--groups needs one count per scale of --hidden {hidden}, >= 1 but for the finest "
                              f"scales, which may have 0 (no latents: pre-/post-processing only); got {groups}")
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

        # bottom-up: stem, then per scale one block of cells per group (its output feeds that group), then down;
        # a scale without groups has one block whose output feeds only the next scale (NVAE's pre-processing)
        self.stem = nn.Conv2d(c, hidden[0], 3, stride=2, padding=1)
        self.enc_groups = groups[::-1]  # groups of scale s, finest first
        self.enc = nn.ModuleList(
            nn.ModuleList(self._cells(hidden[s]) for _ in range(max(self.enc_groups[s], 1))) for s in range(n_scales))
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
        self.post = nn.ModuleList(self._cells(hidden[s]) for s in range(min(self.group_scale)))  # post-processing
        # one parameter per pixel from scale 0 (H/2): sub-pixel convolution (Shi et al. 2016), cropped for odd sizes
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(hidden[0], 4 * c, 3, padding=1), nn.PixelShuffle(2))
        self.likelihood = build_likelihood(likelihood, sigma=sigma, channels=c)
        self.register_buffer("zero", torch.zeros(self.latent_dim), persistent=False)
        self.register_buffer("one", torch.ones(self.latent_dim), persistent=False)

        # every conv and linear layer enters the spectral regulariser; a tuple, so not registered twice
        self._weighted = tuple(m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        self.spectral = SpectralNorms([m.weight.shape for m in self._weighted])
        # channels-last weights make every convolution's output channels-last too: ~9% faster training steps on
        # a CPU (oneDNN's preferred layout for these small channel counts); runs.load_optimizer re-lays Adam's
        # moments to match, which torch's fused Adam needs
        self.to(memory_format=torch.channels_last)

    def _cells(self, channels: int) -> nn.Sequential:
        return nn.Sequential(*(ResidualCell(channels, channels) for _ in range(self.cells)))

    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features for each group, in top-down order: L tensors (B, c_l, h_l, w_l)."""
        h = self.stem(x)
        features = []
        for s, blocks in enumerate(self.enc):
            for block in blocks:
                h = block(h)
                if self.enc_groups[s]:
                    features.append(h)
            if s < len(self.down):
                h = self.down[s](h)
        return features[::-1]  # the deepest features inform the top group, as in NVAE

    def _posterior(self, mu_p: torch.Tensor, scale_p: torch.Tensor, params: torch.Tensor) -> Distribution:
        """q(z_l | x, z_<l) relative to its prior (NVAE eq. 2): mu_q = mu_p + dmu, sigma_q = sigma_p * dsigma.

        As in NVAE's code, the floor is added after the product (their scale is exp(log s_p + log ds) + 0.01);
        scale_p is the prior's scale without its floor, and dsigma = 1 where the head outputs 0.
        """
        delta_mu, raw = params.chunk(2, -3)  # (.., 2 C_z, h, w) -> channel halves
        delta_sigma = F.softplus(raw + SOFTPLUS_ONE)
        return spatial_normal(mu_p + delta_mu, scale_p * delta_sigma + self.scale_floor)

    def _draw(self, loc: torch.Tensor, scale: torch.Tensor, k: int | None, noise: Noise | None) -> torch.Tensor:
        """loc + scale * eps with eps (K or 1, B, C, h, w): one draw from `noise` per group, in top-down order."""
        batch = loc.shape[-4]
        shape = (1 if k is None else k, batch, *loc.shape[-3:])
        eps = torch.randn(shape, device=loc.device) if noise is None else noise.normal(shape).to(loc)
        z = loc + scale * eps  # (K, B, C, h, w)
        return z[0] if k is None else z

    def _top_down(self, batch: int, features: list[torch.Tensor] | None = None, *, k: int | None = None,
                  noise: Noise | None = None, z_top: torch.Tensor | None = None, temperature: float = 1.0,
                  use_mean: bool = False) -> tuple[list[Group], torch.Tensor]:
        """The shared top-down pass; returns the groups and one likelihood parameter per pixel, (K*B, C, H, W).

        With features, z_l comes from the posterior (its mean if use_mean), else from the prior with its
        scale times temperature; z_top, when given, fixes z_1 (B, C_z, h, w).
        """
        kk = 1 if k is None else k
        lead = (batch,) if k is None else (k, batch)
        unflat = (lambda t: t) if k is None else (lambda t: t.view(*lead, *t.shape[1:]))  # (K*B, ..) -> (K, B, ..)
        groups, s = [], None
        for i, scale in enumerate(self.group_scale):
            if i == 0:  # p(z_1) = N(0, I), as in NVAE's code
                mu_p, scale_p = self._top_prior_params(batch)
                qz = None if features is None else self._posterior(mu_p, scale_p, self.post_heads[0](features[0]))
                s = self.h0.expand(kk * batch, *self.h0.shape)
            else:
                if scale != self.group_scale[i - 1]:
                    s = self.up[scale](s)
                mu_p, raw_p = self.prior_heads[i - 1](s).chunk(2, 1)  # (K*B, C_z, h, w)
                mu_p, scale_p = unflat(mu_p), unflat(soft_scale(raw_p, self.scale_floor))
                qz = None
                if features is not None:  # bottom-up features of x (B, ..) meet the state of each sample (K, B, ..)
                    context = unflat(self.post_combine[i - 1](s)) + features[i]
                    qz = self._posterior(mu_p, scale_p, unflat(self.post_heads[i](context.reshape(s.shape))))
            pz = spatial_normal(mu_p, scale_p + self.scale_floor)
            if i == 0 and z_top is not None:
                z = z_top
            elif qz is not None:
                z = qz.mean if use_mean else self._draw(qz.base_dist.loc, qz.base_dist.scale, k, noise)
            elif temperature == 0:  # no draw at all: deterministic, and the global generator is left alone
                z = mu_p
            else:
                z = self._draw(mu_p, temperature * pz.base_dist.scale, k, noise)
            groups.append(Group(qz, pz, z))
            z_flat = z.expand(*lead, *z.shape[-3:]).reshape(kk * batch, *z.shape[-3:])  # (K*B, C_z, h, w)
            s = self.dec[i](self.merge[i](torch.cat([s, z_flat], 1)))
        for scale in reversed(range(len(self.post))):  # the finer scales without latent groups
            s = self.post[scale](self.up[scale](s))
        height, width = self.input_shape[1:]
        return groups, self.head(s)[..., :height, :width]

    def forward(self, x: torch.Tensor, k: int | None = None, noise: Noise | None = None) -> HierarchicalOutput:
        """One pass with reparameterised samples of every group: (B, ..), or (K, B, ..) when k is given.

        noise: where the standard normal draws come from (default: torch's global generator).
        """
        check_images(x, self.input_shape, "forward", self)
        groups, params = self._top_down(x.shape[0], self.bottom_up(x), k=k, noise=noise)
        lead = x.shape[:1] if k is None else (k, x.shape[0])
        return HierarchicalOutput(groups, self.likelihood(params.view(*lead, *self.input_shape)), k, self.group_sizes)

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z_1 | x) of the top group, flattened: batch shape (B,), event shape (D_top,)."""
        return self._encode(x, "encode")

    def _encode(self, x: torch.Tensor, method: str) -> Distribution:
        """encode(x), its input checked under the name of the method called (once)."""
        check_images(x, self.input_shape, method, self)
        mu_p, scale_p = self._top_prior_params(x.shape[0])
        qz = self._posterior(mu_p, scale_p, self.post_heads[0](self.bottom_up(x)[0])).base_dist
        return diagonal_normal(qz.loc.flatten(1), qz.scale.flatten(1))

    def _top_prior_params(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_1) = N(0, I) (as in NVAE's code): its mean (B, C_z, h, w) and its scale without the floor."""
        mu_p = self.h0.new_zeros(batch, *self.group_shapes[0])
        return mu_p, mu_p.new_full((), 1.0 - self.scale_floor)  # (new_tensor: a host-to-GPU copy every call)

    def prior(self) -> Distribution:
        """p(z_1) = N(0, I) over the flattened top group: event shape (D_top,)."""
        return standard_normal(self.zero, self.one)

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x | z_1, z_>1 = prior means) for flattened top-group codes z (..., D_top): batch shape z.shape[:-1].

        The lower groups at temperature 0 make p(x|z) a function of the top group alone, so generic code
        (interpolations, traversals, the latent explorer) works on z_1 as on a VAE's z.
        """
        check_codes(z, self.latent_dim, "decode", self)
        lead = z.shape[:-1]
        z_top = z.reshape(-1, *self.group_shapes[0])
        _, params = self._top_down(z_top.shape[0], z_top=z_top, temperature=0.0)
        return self.likelihood(params.view(*lead, *self.input_shape))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Point codes (B, D_top): the top group's posterior means, flattened."""
        return self._encode(x, "embed").mean

    @torch.no_grad()
    def group_means(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Posterior means of every group, each flattened to (B, s_l), with the groups above at their means."""
        check_images(x, self.input_shape, "group_means", self)
        groups, _ = self._top_down(x.shape[0], self.bottom_up(x), use_mean=True)
        return [g.z.flatten(1) for g in groups]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z) with every group at its posterior mean, shape of x."""
        check_images(x, self.input_shape, "reconstruct", self)
        _, params = self._top_down(x.shape[0], self.bottom_up(x), use_mean=True)
        return self.likelihood(params).mean

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, *, mean: bool = True) -> torch.Tensor:
        """n images: z_l ~ N(mu_p, (t sigma_p)^2) top-down, then the mean of p(x|z) (or a draw from it).

        Temperatures below 1 trade diversity for quality (NVAE Sec. 5); t = 0 is deterministic.
        """
        n = check_count(n, "sample")
        if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
            temperature = temperature.item()
        # real numbers (NumPy's too, which were refused), not True
        if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real)
                                                 and 0 <= temperature <= MAX_TEMPERATURE):
            raise InputError(f"sample: temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {temperature!r}")
        temperature = float(temperature)
        _, params = self._top_down(n, temperature=temperature)
        px_z = self.likelihood(params)
        return px_z.mean if mean else px_z.sample()

    def spectral_penalty(self, iterations: int = 1) -> torch.Tensor:
        """sum_i sigma_max(W_i) over every conv and linear weight: NVAE's spectral regulariser L_SR (Sec. 3.3.2).

        Add lambda * this to the loss (NVAE: lambda = 0.1 or 0.01); each call advances the power iteration.
        """
        return self.spectral([m.weight for m in self._weighted], iterations).sum()

