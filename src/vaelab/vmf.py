"""Von Mises-Fisher latents on the hypersphere S^(m-1) in R^m, with a uniform prior.

Davidson et al. 2018, "Hyperspherical Variational Auto-Encoders"; Xu & Durrett 2018, "Spherical Latent
Spaces for Stable Variational Autoencoders". The densities need log I_v(kappa), the modified Bessel function
of the first kind, for v = m/2 - 1 and kappa over many decades: vaelab.bessel builds it in pure torch.
Shapes: loc (B, m), kappa (B, 1); samples z (B, m), or (K, B, m) with K samples per example.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl

from .bessel import bessel_iv_ratio, log_bessel_iv
from .latents import Noise
from .linear import Linear

# Wood's test accepts a proposal with probability at least 0.65 (measured over m in [2, 128] and kappa in
# [1e-3, 1e5]), so 8 proposals per sample leave about 1 sample in 4,000 for a second round.
_PROPOSALS = 8
_MAX_ROUNDS = 100


class _UnitSphere(constraints.Constraint):
    """Vectors of norm 1 along the last dimension (within float32 rounding)."""

    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        """True where |value| = 1, over the batch dimensions."""
        return (torch.linalg.vector_norm(value, dim=-1) - 1).abs() < 1e-4


unit_sphere = _UnitSphere()


def _normal(noise: Noise | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Standard normals of `shape` from `noise`, or from torch's global generator, with like's dtype and device."""
    if noise is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return noise.normal(shape).to(like)


def log_sphere_area(m: int) -> float:
    """log of the surface area 2 pi^(m/2) / Gamma(m/2) of S^(m-1) in R^m."""
    return math.log(2) + 0.5 * m * math.log(math.pi) - math.lgamma(0.5 * m)


class HypersphericalUniform(Distribution):
    """The uniform distribution on S^(m-1) in R^m; batch shape () (or as expanded), event shape (m,).

    Args:
        dim: m, the ambient dimension (m >= 2).
        like: a tensor whose device and dtype the distribution takes (else `device`, `dtype`).
    """

    arg_constraints: dict = {}
    support = unit_sphere
    has_rsample = True

    def __init__(self, dim: int, *, like: torch.Tensor | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, validate_args: bool | None = None):
        if dim < 2:
            raise ValueError(f"the sphere S^(m-1) needs m >= 2, got dim={dim}")
        self.dim = dim
        self._zero = torch.zeros((), device=like.device if like is not None else device,
                                 dtype=like.dtype if like is not None else dtype or torch.get_default_dtype())
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: HypersphericalUniform | None = None
               ) -> HypersphericalUniform:
        """The same distribution with a batch shape (e.g. to pair it with a batch of posteriors)."""
        new = HypersphericalUniform(self.dim, like=self._zero, validate_args=False)
        new._zero = self._zero.expand(batch_shape)
        Distribution.__init__(new, torch.Size(batch_shape), self.event_shape, validate_args=False)
        return new

    @property
    def mean(self) -> torch.Tensor:
        """E[z] = 0."""
        return self._zero[..., None].expand(*self.batch_shape, self.dim)

    @property
    def variance(self) -> torch.Tensor:
        """Var[z_i] = 1/m for each coordinate: the m squares sum to 1 and are exchangeable."""
        return (self._zero[..., None] + 1.0 / self.dim).expand(*self.batch_shape, self.dim)

    def rsample(self, sample_shape: tuple[int, ...] = (), noise: Noise | None = None) -> torch.Tensor:
        """Normalised standard normals (Muller 1959), (*sample_shape, *batch_shape, m)."""
        shape = (*sample_shape, *self.batch_shape, self.dim)
        return F.normalize(_normal(noise, shape, self._zero), dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """-log area(S^(m-1)) at every z (..., m)."""
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return (self._zero - log_sphere_area(self.dim)).expand(shape)

    def entropy(self) -> torch.Tensor:
        """log area(S^(m-1)), the largest entropy on the sphere."""
        return self._zero + log_sphere_area(self.dim)


class VonMisesFisher(Distribution):
    """vMF(loc, kappa) on S^(m-1): density C_m(kappa) exp(kappa <loc, z>) w.r.t. the surface measure.

    Args:
        loc: mean directions (..., m), unit vectors.
        scale: concentrations kappa (..., 1), positive.
    """

    arg_constraints = {"loc": unit_sphere, "scale": constraints.positive}
    support = unit_sphere
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None):
        scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
        scale = scale.reshape(1) if scale.dim() == 0 else scale
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], scale.shape[:-1])
        self.m = loc.shape[-1]
        self.order = self.m / 2 - 1  # v, the Bessel order of the normaliser
        if self.m < 2:
            raise ValueError(f"the sphere S^(m-1) needs m >= 2, got loc of shape {tuple(loc.shape)}")
        self.loc = loc.expand(*batch_shape, self.m)
        self.scale = scale.expand(*batch_shape, 1)
        super().__init__(batch_shape, torch.Size([self.m]), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: VonMisesFisher | None = None) -> VonMisesFisher:
        """The same distribution broadcast to a larger batch shape."""
        batch_shape = torch.Size(batch_shape)
        return VonMisesFisher(self.loc.expand(*batch_shape, self.m), self.scale.expand(*batch_shape, 1),
                              validate_args=False)

    @property
    def mode(self) -> torch.Tensor:
        """The mean direction loc, on the sphere (kappa > 0); the mean lies inside the ball."""
        return self.loc

    @property
    def mean(self) -> torch.Tensor:
        """E[z] = A_m(kappa) loc with A_m = I_{m/2} / I_{m/2-1} (Mardia & Jupp 2000, "Directional Statistics")."""
        return bessel_iv_ratio(self.order, self.scale) * self.loc

    @property
    def variance(self) -> torch.Tensor:
        """Var[z_i], the diagonal of Cov z = (A / kappa) I + (1 - m A / kappa - A^2) loc loc^T, A = A_m(kappa)
        (Mardia & Jupp 2000, Sec. 9.3.2): with the squared mean the variances sum to E|z|^2 = 1."""
        a = bessel_iv_ratio(self.order, self.scale)
        return (a / self.scale + (1 - self.m * a / self.scale - a**2) * self.loc**2).clamp(min=0)

    def _log_normalizer64(self) -> torch.Tensor:
        """log C_m(kappa) = (m/2 - 1) log kappa - (m/2) log(2 pi) - log I_{m/2-1}(kappa), in float64, batch shape."""
        kappa = self.scale.squeeze(-1).double()
        return self.order * torch.log(kappa) - 0.5 * self.m * math.log(2 * math.pi) - log_bessel_iv(self.order, kappa)

    def _neg_entropy64(self) -> torch.Tensor:
        """E[log q(z)] = kappa A_m(kappa) + log C_m(kappa) in float64: for small kappa it nearly cancels log area."""
        kappa = self.scale.squeeze(-1).double()
        return kappa * bessel_iv_ratio(self.order, kappa) + self._log_normalizer64()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """kappa <loc, z> + log C_m(kappa), for z (..., m) broadcast against the batch shape."""
        if self._validate_args:
            self._validate_sample(value)
        kappa = self.scale.squeeze(-1)
        return kappa * (self.loc * value).sum(-1) + self._log_normalizer64().to(kappa.dtype)

    def entropy(self) -> torch.Tensor:
        """H = -kappa A_m(kappa) - log C_m(kappa) (Davidson et al. 2018, Sec. 3)."""
        return -self._neg_entropy64().to(self.scale.dtype)

    def rsample(self, sample_shape: tuple[int, ...] = (), noise: Noise | None = None) -> torch.Tensor:
        """Reparameterised samples (*sample_shape, *batch_shape, m) (Wood 1994; Davidson et al. 2018, Algorithm 1).

        Args:
            sample_shape: leading shape of the draws.
            noise: an object with normal(shape) giving standard normals (default: torch's global generator);
                it is the only source of randomness, and every shape it is asked for starts with
                (*sample_shape, *batch_shape). Gradients reach loc, and kappa through w's transform of the
                accepted proposal: the reparameterisation part g_rep of the gradient only. For m != 3 w comes
                from a rejection sampler and its kappa gradient then lacks the correction term g_cor (1-13%
                low for m = 5-64); rsample_and_score gives what an objective needs to add it.
        """
        return self._draw(sample_shape, noise, with_score=False)[0]

    def rsample_and_score(self, sample_shape: tuple[int, ...] = (), noise: Noise | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """rsample's z, and log pi(eps | kappa) of the rejection sampler's accepted proposals, (*S, *B).

        Through a rejection sampler, d/dkappa E_q[f(z)] = E[df(z)/dkappa] + E[f(z) d log pi(eps|kappa)/dkappa]
        (Naesseth et al. 2017, "Reparameterization Gradients through Acceptance-Rejection Sampling
        Algorithms", eq. 8: g_rep + g_cor), pi the density of the accepted eps ~ Beta((m-1)/2, (m-1)/2),
        pi(eps|kappa) = q(w|kappa) |dw/deps| with w = h(eps, kappa) Wood's transform and q(w|kappa) =
        C(kappa) exp(kappa w) (1 - w^2)^((m-3)/2) the marginal of w (Davidson et al. 2018, Appendix).
        The score carries that gradient with eps held (its value, up to a constant, is the log-density);
        an objective adds (f - b) * (score - score.detach()) with f detached and any baseline b that does
        not depend on these draws. None for m = 3, where w's inverse CDF is exact and g_cor is zero, and
        when kappa needs no gradient (fixed, or under no_grad).
        """
        return self._draw(sample_shape, noise, with_score=True)

    def _draw(self, sample_shape: tuple[int, ...], noise: Noise | None,
              with_score: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z, and the score when with_score (rsample alone does not compute what it would discard)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        # The tangent direction comes first, so the n-th round of proposals is always the (n+1)-th draw.
        v = F.normalize(_normal(noise, (*shape, self.m - 1), self.loc), dim=-1)  # uniform on S^(m-2)
        if self.m == 3:
            w, radius = _w_inverse_cdf(self.scale, self.m, shape, noise)  # (*S, *B, 1)
            score = None
        else:
            w, radius, s1, s2, b = _w_wood(self.scale, self.m, shape, noise)
            # q(w)'s normaliser C(kappa) = 1 / int exp(kappa w) (1 - w^2)^((m-3)/2) dw depends on kappa as the
            # vMF's C_m does, v log kappa - log I_v(kappa), so log C_m stands for it (constants carry no gradient).
            # log |dw/de| = log 2b - 2 log(1 - (1 - b) e), 1 - (1 - b) e = (s2 + b s1) / (s1 + s2) (s1 + s2 held
            # with e); 1 - w^2 = radius^2.
            score = None if not (with_score and self.scale.requires_grad) else (
                self._log_normalizer64().to(w.dtype)
                + (self.scale * w + (self.m - 3) * torch.log(radius) + torch.log(2 * b)
                   - 2 * torch.log(s2 + b * s1)).squeeze(-1))
        z = torch.cat([w, radius * v], dim=-1)  # (*S, *B, m), around e_1
        return _householder(z, self.loc), score


def _w_inverse_cdf(kappa: torch.Tensor, m: int, shape: torch.Size,
                   noise: Noise | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w = <loc, z> and sqrt(1 - w^2) on S^2, by inverting w's CDF (Jakob 2012): each (*shape, 1)."""
    n = _normal(noise, (*shape, 1), kappa).double()
    k = kappa.double()  # at small kappa the log below is ~ -2 kappa (1 - u), and / kappa would amplify rounding
    # w = 1 + log(u + (1 - u) exp(-2 kappa)) / kappa, with u = Phi(n) and 1 - u = Phi(-n)
    one_minus_w = -torch.logaddexp(torch.special.log_ndtr(n), torch.special.log_ndtr(-n) - 2 * k) / k
    radius = torch.sqrt((one_minus_w * (2 - one_minus_w)).clamp_min(1e-300))
    return (1 - one_minus_w).to(kappa), radius.to(kappa)


def _w_wood(kappa: torch.Tensor, m: int, shape: torch.Size,
            noise: Noise | None) -> tuple[torch.Tensor, ...]:
    """w = <loc, z> and sqrt(1 - w^2) by Wood's (1994) rejection sampler, each (*shape, 1), with the accepted
    chi-square pair s1, s2 (no gradient) and Wood's b(kappa) they were transformed with."""
    M = m - 1
    # Wood 1994: b = (-2 kappa + sqrt(4 kappa^2 + M^2)) / M, rationalised so large kappa does not cancel.
    b = M / (2 * kappa + torch.sqrt(4 * kappa * kappa + M * M))  # (*B, 1)
    s1, s2 = _accepted_beta(b.detach(), M, shape, noise)  # the accepted e = s1 / (s1 + s2)
    # Wood 1994's proposal w = (1 - (1 + b) e) / (1 - (1 - b) e); it and sqrt(1 - w^2) in s1, s2 lose no digits at 1.
    w = (s2 - b * s1) / (s2 + b * s1)
    radius = 2 * torch.sqrt(b * s1 * s2) / (s2 + b * s1)
    return w, radius, s1, s2, b


@torch.compiler.disable(reason="Wood's rejection loop stops on a data-dependent test")  # runs eagerly
def _accepted_beta(b: torch.Tensor, M: int, shape: torch.Size,
                   noise: Noise | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chi-square pairs (s1, s2), each (*shape, 1), of the first proposal e = s1/(s1 + s2) Wood's test accepts.

    Beta(M/2, M/2) is |g1|^2 / (|g1|^2 + |g2|^2) with g1, g2 ~ N(0, I_M), and u = Phi(n) is uniform, so every
    draw is a standard normal. Rounds of _PROPOSALS proposals repeat until every sample has accepted one.
    """
    s1 = s2 = None
    done = torch.zeros((*shape, 1), dtype=torch.bool, device=b.device)
    for _ in range(_MAX_ROUNDS):
        g = _normal(noise, (*shape, _PROPOSALS, 2 * M + 1), b)
        p1, p2 = g[..., :M].square().sum(-1), g[..., M:2 * M].square().sum(-1)  # (*shape, R)
        log_u = torch.special.log_ndtr(g[..., -1])
        denom = p2 + b * p1  # (1 - (1 - b) e) (p1 + p2)
        # Wood 1994's test: kappa w + M log(1 - x0 w) - c >= log u with x0 = (1 - b)/(1 + b), rewritten in
        # p1, p2 using M (1 - b^2) = 4 kappa b, so that no two large terms cancel.
        test = M * (1 - b) * (p2 - p1) / (2 * denom) + M * torch.log((1 + b) * (p1 + p2) / (2 * denom))
        accept = test >= log_u
        first = accept.to(b.dtype).argmax(-1, keepdim=True)  # the first accepted proposal (index 0 if none)
        new1, new2 = p1.gather(-1, first), p2.gather(-1, first)
        take = accept.any(-1, keepdim=True) & ~done
        s1 = new1 if s1 is None else torch.where(take, new1, s1)
        s2 = new2 if s2 is None else torch.where(take, new2, s2)
        done = done | take
        if bool(done.all()):
            return s1, s2
    raise RuntimeError(f"Wood's sampler accepted nothing in {_MAX_ROUNDS} rounds; is kappa finite?")


def _householder(z: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Reflect z by H = I - 2 u u^T, u = (e_1 - loc) / |e_1 - loc|: H e_1 = loc (Davidson et al. 2018, Alg. 1)."""
    e1 = torch.zeros_like(loc)
    e1[..., 0] = 1
    u = F.normalize(e1 - loc, dim=-1)  # zero when loc = e_1, and then H = I as it should be
    return z - 2 * (z * u).sum(-1, keepdim=True) * u


@register_kl(VonMisesFisher, HypersphericalUniform)
def _kl_vmf_uniform(q: VonMisesFisher, p: HypersphericalUniform) -> torch.Tensor:
    """KL(vMF || U(S^(m-1))) = kappa A_m(kappa) + log C_m(kappa) + log area(S^(m-1)) (Davidson et al. 2018, Sec. 3)."""
    if q.m != p.dim:
        raise ValueError(f"vMF on S^{q.m - 1} against a uniform on S^{p.dim - 1}")
    # (clamped: at kappa ~1e-8 the true KL, ~kappa^2 / 2m, is below float64's rounding of the two terms'
    # difference, which read -2e-13 and printed as a negative KL)
    kl = (q._neg_entropy64() + log_sphere_area(q.m)).clamp_min(0).to(q.scale.dtype)
    return kl.expand(torch.broadcast_shapes(kl.shape, p.batch_shape))


class VMFLatent(nn.Module):
    """q(z|x) = vMF(mu(x), kappa(x)) on S^(m-1), prior p(z) uniform on the sphere (Davidson et al. 2018).

    Args:
        in_features: size of the encoder features h.
        latent_dim: m, the ambient dimension of z (the sphere is S^(m-1)); m >= 2.
        kappa: a fixed concentration for every example (Xu & Durrett 2018), or None to learn
            kappa(x) = softplus(Linear(h)) + 1, the + 1 keeping the posterior from collapsing onto
            the prior (as in Davidson et al. 2018's code).
    """

    def __init__(self, *, in_features: int, latent_dim: int, kappa: float | None = None):
        super().__init__()
        if latent_dim < 2:
            raise ValueError(f"a vMF latent lives on S^(m-1) and needs latent_dim m >= 2, got {latent_dim}")
        if kappa is not None and not kappa > 0:
            raise ValueError(f"a fixed vMF concentration must be positive, got kappa={kappa}")
        self.latent_dim = latent_dim
        self.mu = Linear(in_features, latent_dim)
        self.kappa_head = Linear(in_features, 1) if kappa is None else None
        # config, not state: a checkpoint rebuilds it from the constructor arguments
        self.register_buffer("kappa_fixed", None if kappa is None else torch.tensor(float(kappa)), persistent=False)

    def forward(self, h: torch.Tensor) -> VonMisesFisher:
        """Posterior from encoder features h (B, F); batch shape (B,), event shape (m,)."""
        mu = F.normalize(self.mu(h), dim=-1)
        if self.kappa_head is None:
            kappa = self.kappa_fixed.expand(mu.shape[0], 1)
        else:
            kappa = F.softplus(self.kappa_head(h)) + 1
        return VonMisesFisher(mu, kappa, validate_args=False)

    def prior(self) -> HypersphericalUniform:
        """p(z) uniform on S^(m-1); batch shape (), event shape (m,)."""
        return HypersphericalUniform(self.latent_dim, like=self.mu.weight, validate_args=False)

    @staticmethod
    def rsample(qz: VonMisesFisher, k: int | None = None, noise: Noise | None = None) -> torch.Tensor:
        """Reparameterised z: (B, m), or (K, B, m) with k; every draw from `noise` when given."""
        return VMFLatent._draws(qz, k, noise, with_score=False)[0]

    @staticmethod
    def rsample_and_score(qz: VonMisesFisher, k: int | None = None,
                          noise: Noise | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """rsample's z and the rejection sampler's score (B,) or (K, B) (VonMisesFisher.rsample_and_score)."""
        return VMFLatent._draws(qz, k, noise, with_score=True)

    @staticmethod
    def _draws(qz: VonMisesFisher, k: int | None, noise: Noise | None,
               with_score: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z (and the score when with_score): one draw per example, or k; noise is always asked for a leading
        sample dimension (K, or 1), as density.KeyedNoise expects."""
        if k is None and noise is None:
            return qz._draw((), None, with_score)
        z, score = qz._draw((1 if k is None else k,), noise, with_score)
        if k is None:
            return z[0], None if score is None else score[0]
        return z, score


def on_sphere(model: nn.Module) -> bool:
    """Whether the model's codes live on the sphere (a vMF latent), where its decoder was trained."""
    return isinstance(getattr(model, "posterior", None), VMFLatent)


def codes_between(model: nn.Module, za: torch.Tensor, zb: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Codes a fraction t of the way from za to zb (broadcast together): on the line, or for codes on the sphere
    along the great circle at constant speed (slerp, Shoemake 1985). The line's midpoints lie inside the sphere
    (norm cos(theta / 2)), where a vMF model's decoder never saw a code."""
    if not on_sphere(model):
        return (1 - t) * za + t * zb
    cos = (za * zb).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    apart = sin > 1e-3  # (below it float32's division by sin loses the sphere: |z| off by 1e-3 at sin 1e-4)
    arc = (torch.sin((1 - t) * theta) * za + torch.sin(t * theta) * zb) / torch.where(apart, sin, torch.ones_like(sin))
    # (nearly) the same point: the line, normalised; (nearly) opposite points: any great circle through them (the
    # line passed through 0), here the one towards the axis za has least of
    axis = F.one_hot(za.abs().argmin(-1), za.shape[-1]).to(za)
    turn = F.normalize(axis - (axis * za).sum(-1, keepdim=True) * za, dim=-1)
    half_turn = torch.cos(t * math.pi) * za + torch.sin(t * math.pi) * turn
    near = torch.where(cos > 0, F.normalize((1 - t) * za + t * zb, dim=-1), half_turn)
    return torch.where(apart, arc, near)
