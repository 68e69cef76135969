"""Von Mises-Fisher latents on the hypersphere S^(m-1) in R^m, with a uniform prior.

Davidson et al. 2018, "Hyperspherical Variational Auto-Encoders"; Xu & Durrett 2018, "Spherical Latent
Spaces for Stable Variational Autoencoders". The densities need log I_v(kappa), the modified Bessel function
of the first kind, for v = m/2 - 1 and kappa over many decades: it is built here in pure torch.
Shapes: loc (B, m), kappa (B, 1); samples z (B, m), or (K, B, m) with K samples per example.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl

from .latents import Noise
from .linear import Linear

# log I_v(kappa): the power series up to _SERIES_MAX, an asymptotic expansion above it. 64 series terms leave
# under 1e-23 of the sum at kappa = 50; above 50, Hankel's expansion (20 terms) for v < 8 and Debye's (12 terms)
# for v >= 8 are exact to rounding. Against mpmath for v in [0, 63.5], kappa in [1e-4, 1e5]: log I_v within
# 4e-14 (relative where |log I_v| > 1, else absolute), I_{v+1}/I_v within 3e-13 relative.
_SERIES_MAX = 50.0
_SERIES_TERMS = 64
_HANKEL_TERMS = 20
_DEBYE_MIN_ORDER = 8.0
_DEBYE_TERMS = 12

# Wood's test accepts a proposal with probability at least 0.65 (measured over m in [2, 128] and kappa in
# [1e-3, 1e5]), so 8 proposals per sample leave about 1 sample in 4,000 for a second round.
_PROPOSALS = 8
_MAX_ROUNDS = 100


def _debye_polynomials(n: int) -> list[list[Fraction]]:
    """Coefficients (in t) of u_0 .. u_n of Debye's expansion, by the recurrence of DLMF 10.41.10."""
    polys = [[Fraction(1)]]
    for _ in range(n):
        u = polys[-1]
        nxt = [Fraction(0)] * (len(u) + 3)
        for p, c in enumerate(u):
            # u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds
            if p:
                nxt[p + 1] += p * c / 2
                nxt[p + 3] -= p * c / 2
            nxt[p + 1] += c / (8 * (p + 1))
            nxt[p + 3] -= 5 * c / (8 * (p + 3))
        polys.append(nxt)
    return polys


_DEBYE_U = _debye_polynomials(_DEBYE_TERMS)


def _table(fn: Callable[[float], tuple[float, ...]]) -> Callable[[float], tuple[float, ...]]:
    """fn, memoised; torch.compile calls it as a constant instead of tracing its Python (dynamo inlines an
    lru_cache's function, Fractions and all, and warns)."""
    cached = functools.lru_cache(maxsize=512)(fn)

    @functools.wraps(fn)
    def table(v: float) -> tuple[float, ...]:
        return cached(v)

    return torch.compiler.assume_constant_result(table)


@_table
def _debye_coefficients(v: float) -> tuple[float, ...]:
    """Coefficients in t of sum_{k >= 1} u_k(t) / v^k for one order v."""
    return tuple(float(sum(u[p] / Fraction(v) ** k for k, u in enumerate(_DEBYE_U) if k and p < len(u)))
                 for p in range(len(_DEBYE_U[-1])))


@_table
def _hankel_coefficients(v: float) -> tuple[float, ...]:
    """Coefficients in x = 1/kappa of sum_{j >= 1} (-1)^j a_j(v) x^j (DLMF 10.40.1)."""
    coeffs, a = [0.0], 1.0
    for j in range(1, _HANKEL_TERMS + 1):
        a *= -(4 * v * v - (2 * j - 1) ** 2) / (8 * j)
        coeffs.append(a)
    return tuple(coeffs)


def _polyval(coeffs: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """sum_p coeffs[p] x^p, as one matrix product with the powers of x."""
    powers = torch.vander(x.reshape(-1), N=len(coeffs), increasing=True)
    return (powers @ x.new_tensor(coeffs)).reshape(x.shape)


def _log_ive_series(v: float, kappa: torch.Tensor) -> torch.Tensor:
    """log I_v - kappa from the power series (DLMF 10.25.2), summed as 1 + positive terms, hence no cancellation."""
    j = torch.arange(1, _SERIES_TERMS + 1, dtype=kappa.dtype, device=kappa.device)
    terms = torch.cumprod((kappa * kappa / 4).unsqueeze(-1) / (j * (v + j)), dim=-1)  # (k^2/4)^j / (j! (v+1)_j)
    lead = v * torch.log(kappa / 2) if v else torch.zeros_like(kappa)
    return lead - math.lgamma(v + 1) + torch.log1p(terms.sum(-1)) - kappa


def _log_ive_hankel(v: float, kappa: torch.Tensor) -> torch.Tensor:
    """log I_v - kappa for large kappa, fixed v: Hankel's expansion, DLMF 10.40.1 (it terminates at half-integer v)."""
    return -0.5 * torch.log(2 * math.pi * kappa) + torch.log1p(_polyval(_hankel_coefficients(v), 1 / kappa))


def _log_ive_debye(v: float, kappa: torch.Tensor) -> torch.Tensor:
    """log I_v - kappa for large v, uniformly in kappa: Debye's expansion of I_v(v z), DLMF 10.41.3."""
    r = torch.sqrt(v * v + kappa * kappa)  # v sqrt(1 + z^2), z = kappa / v
    t = v / r
    # v eta - kappa, eta = sqrt(1 + z^2) + log(z / (1 + sqrt(1 + z^2))); r - kappa = v^2 / (r + kappa) spares the
    # subtraction of nearly equal numbers, and so does log(kappa / (v + r)) = -log1p((v + r - kappa) / kappa).
    r_minus_kappa = v * v / (r + kappa)
    v_eta = r_minus_kappa - v * torch.log1p((v + r_minus_kappa) / kappa)
    tail = _polyval(_debye_coefficients(v), t)  # sum_{k >= 1} u_k(t) / v^k
    return v_eta - 0.5 * math.log(2 * math.pi * v) + 0.5 * torch.log(t) + torch.log1p(tail)


def _log_ive64(v: float, kappa: torch.Tensor) -> torch.Tensor:
    """log(I_v(kappa) e^-kappa) in float64, by region; scaled like scipy's ive so that ratios lose no digits."""
    kappa = kappa.double()
    large = kappa.clamp(min=_SERIES_MAX)  # every branch runs on clamped input, so none makes inf or NaN
    asymptotic = _log_ive_debye(v, large) if v >= _DEBYE_MIN_ORDER else _log_ive_hankel(v, large)
    return torch.where(kappa <= _SERIES_MAX, _log_ive_series(v, kappa.clamp(max=_SERIES_MAX)), asymptotic)


class _IvRatio(torch.autograd.Function):
    """R_v(kappa) = I_{v+1}(kappa) / I_v(kappa), computed in float64 whatever the input dtype."""

    @staticmethod
    def forward(ctx, kappa: torch.Tensor, v: float) -> torch.Tensor:
        ratio = torch.exp(_log_ive64(v + 1, kappa) - _log_ive64(v, kappa))
        ctx.v = v
        ctx.save_for_backward(kappa, ratio)
        return ratio.to(kappa.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        kappa, ratio = ctx.saved_tensors
        # R_v' = 1 - R_v^2 - (2v + 1) R_v / kappa, from DLMF 10.29.2; float64 since the terms cancel at large kappa.
        d_ratio = 1 - ratio * ratio - (2 * ctx.v + 1) * ratio / kappa.double()
        return grad * d_ratio.to(grad.dtype), None


class _LogIv(torch.autograd.Function):
    """log I_v(kappa), with d/dkappa log I_v = R_v(kappa) + v / kappa (DLMF 10.29.2)."""

    @staticmethod
    def forward(ctx, kappa: torch.Tensor, v: float) -> torch.Tensor:
        ctx.v = v
        ctx.save_for_backward(kappa)
        return (_log_ive64(v, kappa) + kappa.double()).to(kappa.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (kappa,) = ctx.saved_tensors
        return grad * (_IvRatio.apply(kappa, ctx.v) + ctx.v / kappa), None


def _check_order(v: float) -> float:
    """The order as a float; the expansions here hold for v >= 0."""
    if v < 0:
        raise ValueError(f"Bessel order v must be >= 0, got {v}")
    return float(v)


def log_bessel_iv(v: float, kappa: torch.Tensor) -> torch.Tensor:
    """log I_v(kappa), the modified Bessel function of the first kind, differentiable in kappa.

    Args:
        v: the order, v >= 0 (v = m/2 - 1 for the vMF on S^(m-1)).
        kappa: positive arguments, any shape, float32 or float64, any device; evaluated in float64.
    """
    return _LogIv.apply(kappa, _check_order(v))


def bessel_iv_ratio(v: float, kappa: torch.Tensor) -> torch.Tensor:
    """I_{v+1}(kappa) / I_v(kappa), differentiable in kappa; A_m(kappa) of the vMF is bessel_iv_ratio(m/2 - 1, kappa).

    Args:
        v: the order, v >= 0.
        kappa: positive arguments, any shape, float32 or float64, any device; evaluated in float64.
    """
    return _IvRatio.apply(kappa, _check_order(v))


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
    """The uniform distribution on S^(m-1) in R^m; batch shape (), event shape (m,).

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

    @property
    def mean(self) -> torch.Tensor:
        """E[z] = 0."""
        return self._zero.expand(self.dim)

    @property
    def variance(self) -> torch.Tensor:
        """Var[z_i] = 1/m for each coordinate: the m squares sum to 1 and are exchangeable."""
        return (self._zero + 1.0 / self.dim).expand(self.dim)

    def rsample(self, sample_shape: tuple[int, ...] = (), noise: Noise | None = None) -> torch.Tensor:
        """Normalised standard normals (Muller 1959), (*sample_shape, m)."""
        return F.normalize(_normal(noise, (*sample_shape, self.dim), self._zero), dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """-log area(S^(m-1)) at every z (..., m)."""
        if self._validate_args:
            self._validate_sample(value)
        return (self._zero - log_sphere_area(self.dim)).expand(value.shape[:-1])

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
    def mean(self) -> torch.Tensor:
        """E[z] = A_m(kappa) loc with A_m = I_{m/2} / I_{m/2-1} (Mardia & Jupp 2000, "Directional Statistics")."""
        return bessel_iv_ratio(self.order, self.scale) * self.loc

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
    return (q._neg_entropy64() + log_sphere_area(q.m)).to(q.scale.dtype)


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
