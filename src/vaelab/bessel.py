"""Modified Bessel functions of the first kind in log space, in pure torch: log I_v(kappa) and the ratio
I_{v+1}(kappa) / I_v(kappa), differentiable in kappa, for the von Mises-Fisher's normaliser and mean (vmf.py).
They must hold for kappa over many decades: a power series for small kappa, asymptotic expansions above it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from fractions import Fraction

import torch

# log I_v(kappa): the power series up to _SERIES_MAX, an asymptotic expansion above it. 64 series terms leave
# under 4e-21 of the sum at kappa = 50 (3.2e-21 at v = 0, less as v grows: far below float64's 1e-16); above 50,
# Hankel's expansion (20 terms) for v < 8 and Debye's (12 terms)
# for v >= 8 are exact to rounding. Against mpmath for v in [0, 63.5], kappa in [1e-4, 1e5]: log I_v within
# 4e-14 (relative where |log I_v| > 1, else absolute), I_{v+1}/I_v within 3e-13 relative.
_SERIES_MAX = 50.0
_SERIES_TERMS = 64
_HANKEL_TERMS = 20
_DEBYE_MIN_ORDER = 8.0
_DEBYE_TERMS = 12


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
    if torch.compiler.is_compiling():  # (a traced tensor kept in the cache would break later calls)
        return (powers @ x.new_tensor(coeffs)).reshape(x.shape)
    return (powers @ _as_tensor(coeffs, x.dtype, x.device)).reshape(x.shape)


@functools.lru_cache(maxsize=256)
def _as_tensor(coeffs: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The coefficients on x's device, made once: x.new_tensor copied them from the host (on a GPU, a copy that
    waits for the device) eight times a vMF step."""
    return torch.tensor(coeffs, dtype=dtype, device=device)


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
