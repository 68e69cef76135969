"""von Mises-Fisher latents: Bessel functions against scipy, samples against moments, densities by quadrature."""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import gammaln, hyp0f1, ive
from torch.distributions import kl_divergence

from vaelab.bessel import bessel_iv_ratio, log_bessel_iv
from vaelab.models import VAE
from vaelab.objectives import elbo, iwae
from vaelab.vmf import HypersphericalUniform, VMFLatent, VonMisesFisher, log_sphere_area

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from vmf_gradient import kappa_gradient  # noqa: E402  (the estimator behind the benchmark's table)

ORDERS = np.arange(0, 64, 0.5)  # v = m/2 - 1 for m = 2 .. 129
KAPPAS = np.concatenate([np.logspace(-4, 5, 541), [50 - 1e-9, 50 + 1e-9]])  # and both sides of the series' limit


def scipy_log_iv(v: float, kappa: np.ndarray) -> np.ndarray:
    """log I_v from scipy: log ive + kappa, or through 0F1 where ive underflows or the "+ kappa" would cancel."""
    with np.errstate(divide="ignore"):
        out = np.log(ive(v, kappa)) + kappa
    series = (kappa < 1) | (ive(v, kappa) < 1e-280)
    k = kappa[series]
    # I_v(k) = (k/2)^v / Gamma(v + 1) 0F1(; v + 1; k^2 / 4)
    out[series] = v * np.log(k / 2) - gammaln(v + 1) + np.log(hyp0f1(v + 1, k * k / 4))
    return out


@pytest.fixture(scope="module")
def reference() -> dict[float, np.ndarray]:
    """scipy's log I_v on KAPPAS for v = 0 .. 64.5, the orders and the orders + 1."""
    return {v: scipy_log_iv(v, KAPPAS) for v in np.arange(0, 65, 0.5)}


class SeededNoise:
    """Standard normals from a private generator, recording every shape asked for."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float64):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.shapes: list[tuple[int, ...]] = []

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        self.shapes.append(tuple(shape))
        return torch.randn(shape, generator=self.generator, dtype=self.dtype)


def random_loc(m: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Unit vectors (*batch, m) in float64, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn((*batch, m), generator=g, dtype=torch.float64), dim=-1)


# ---------------------------------------------------------------------------------------------- Bessel functions


def test_log_bessel_iv_float64_matches_scipy(reference):
    k = torch.tensor(KAPPAS, dtype=torch.float64)
    for v in ORDERS:
        ref, out = reference[v], log_bessel_iv(v, k).numpy()
        err = np.abs(out - ref)
        assert (err / np.abs(ref)).max() < 1e-5, v
        # tighter: 1e-12 relative, or absolute where log I_v crosses zero
        assert (err / np.maximum(np.abs(ref), 1)).max() < 1e-12, v


def test_log_bessel_iv_float32_matches_scipy():
    k32 = torch.tensor(KAPPAS, dtype=torch.float32)
    k = k32.double().numpy()  # the float32-rounded arguments, so only the result's rounding is measured
    for v in ORDERS[::3]:
        ref, out = scipy_log_iv(v, k), log_bessel_iv(v, k32)
        assert out.dtype == torch.float32
        assert (np.abs(out.double().numpy() - ref) / np.maximum(np.abs(ref), 1e-3)).max() < 1e-6, v


def test_bessel_ratio_matches_scipy(reference):
    k = torch.tensor(KAPPAS, dtype=torch.float64)
    for v in ORDERS:
        ref = np.exp(reference[v + 1] - reference[v])
        assert (np.abs(bessel_iv_ratio(v, k).numpy() - ref) / ref).max() < 1e-8, v
        r32 = bessel_iv_ratio(v, k.float())
        assert r32.dtype == torch.float32
        assert (np.abs(r32.double().numpy() - ref) / ref).max() < 1e-5, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_bessel_iv_finite_with_finite_gradients_everywhere(dtype):
    for v in ORDERS:
        k = torch.tensor(KAPPAS, dtype=dtype, requires_grad=True)
        out = log_bessel_iv(v, k)
        (grad,) = torch.autograd.grad(out.sum(), k)
        ratio = bessel_iv_ratio(v, k)
        (d_ratio,) = torch.autograd.grad(ratio.sum(), k)
        for t in (out, grad, ratio, d_ratio):
            assert torch.isfinite(t).all(), (v, dtype)
        assert (grad > 0).all() and (ratio > 0).all() and (ratio < 1).all()


def test_expansion_coefficients_are_made_once_per_order_and_device():
    """They were copied from the host on every call (on a GPU, a copy that waits for the device: eight a vMF
    step); values as before, and the same when first made under inference mode. (Evaluated in float64 whatever
    the input's dtype: one set per order and device.)"""
    from vaelab import bessel

    bessel._as_tensor.cache_clear()
    k = torch.tensor(KAPPAS)
    with torch.inference_mode():
        first = log_bessel_iv(30.0, k)
    misses = bessel._as_tensor.cache_info().misses
    for _ in range(3):
        assert torch.equal(log_bessel_iv(30.0, k), first)
    torch.testing.assert_close(log_bessel_iv(30.0, k.float()), first.float())  # (the same float64 coefficients)
    assert misses > 0 and bessel._as_tensor.cache_info().misses == misses


def test_gradient_is_ratio_plus_v_over_kappa(reference):
    # d/dk log I_v(k) = I_{v+1}(k) / I_v(k) + v / k (DLMF 10.29.2)
    k = torch.tensor(KAPPAS, dtype=torch.float64, requires_grad=True)
    for v in ORDERS[::5]:
        (grad,) = torch.autograd.grad(log_bessel_iv(v, k).sum(), k)
        expected = np.exp(reference[v + 1] - reference[v]) + v / KAPPAS
        assert np.allclose(grad.numpy(), expected, rtol=1e-8, atol=0), v


def test_gradient_matches_finite_differences():
    k = torch.tensor(np.logspace(-3, 5, 33), dtype=torch.float64, requires_grad=True)
    for v in [0.0, 0.5, 3.0, 7.5, 8.0, 31.0, 63.0]:
        (grad,) = torch.autograd.grad(log_bessel_iv(v, k).sum(), k)
        h = 1e-5 * k.detach()
        fd = (log_bessel_iv(v, k.detach() + h) - log_bessel_iv(v, k.detach() - h)) / (2 * h)
        assert torch.allclose(grad, fd, rtol=1e-6, atol=0), v
        (d_ratio,) = torch.autograd.grad(bessel_iv_ratio(v, k).sum(), k)
        fd = (bessel_iv_ratio(v, k.detach() + h) - bessel_iv_ratio(v, k.detach() - h)) / (2 * h)
        assert torch.allclose(d_ratio, fd, rtol=1e-4, atol=0), v  # fd loses digits where R_v' ~ 1 / kappa^2


@pytest.mark.parametrize("v", [0.0, 0.5, 7.5, 8.0, 31.5])
def test_gradcheck(v):
    k = torch.tensor([1e-3, 0.7, 49.9, 50.1, 300.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: log_bessel_iv(v, x), (k,))
    assert torch.autograd.gradcheck(lambda x: bessel_iv_ratio(v, x), (k,))


def test_second_derivative():
    k = torch.tensor([0.3, 20.0, 80.0, 2e3], dtype=torch.float64, requires_grad=True)
    for v in (0.0, 1.5, 30.0):
        assert torch.autograd.gradgradcheck(lambda x, v=v: log_bessel_iv(v, x), (k,))


def test_negative_order_is_rejected():
    with pytest.raises(ValueError):
        log_bessel_iv(-0.5, torch.ones(1))


# ------------------------------------------------------------------------------------------------------ sampling

SAMPLE_CASES = [(m, kappa) for m in (2, 3, 10, 64) for kappa in (0.1, 1.0, 10.0, 100.0, 1000.0)]


def assert_sample_variance(z, variance):
    """Var[z_i] within 5 standard errors of the sample variance of draws z (N, m), coordinate by coordinate."""
    centred = z - z.mean(0)
    var_stderr = ((centred**4).mean(0) - centred.var(0) ** 2).clamp(min=0).sqrt() / math.sqrt(z.shape[0])
    assert ((centred.var(0) - variance).abs() <= 5 * var_stderr + 1e-12).all()


@pytest.mark.parametrize("m,kappa", SAMPLE_CASES)
def test_samples_match_mean_direction_and_resultant_length(m, kappa):
    n = 20_000
    loc = random_loc(m, seed=m)
    q = VonMisesFisher(loc, torch.tensor([kappa], dtype=torch.float64))
    z = q.rsample((n,), noise=SeededNoise(seed=int(kappa * 10) + m))  # (N, m)
    assert z.shape == (n, m)
    assert ((z.norm(dim=-1) - 1).abs() < 1e-12).all()
    # E[z] = A_m(kappa) loc, coordinate by coordinate within 5 standard errors; <loc, z> has mean A_m(kappa)
    stderr = z.std(0) / math.sqrt(n)
    assert ((z.mean(0) - q.mean).abs() <= 5 * stderr + 1e-12).all()
    assert_sample_variance(z, q.variance)  # (stddev raised NotImplementedError)
    torch.testing.assert_close(float(q.variance.sum() + (q.mean**2).sum()), 1.0)
    w = z @ loc
    a_m = bessel_iv_ratio(m / 2 - 1, torch.tensor(kappa, dtype=torch.float64))
    assert abs(w.mean() - a_m) <= 5 * w.std() / math.sqrt(n) + 1e-12


@pytest.mark.parametrize("m", [2, 3, 16, 128])
@pytest.mark.parametrize("kappa", [1e-3, 1.0, 1e5])
def test_float32_samples_are_unit_vectors(m, kappa):
    loc = random_loc(m, seed=0, batch=(4,)).float()
    z = VonMisesFisher(loc, torch.full((4, 1), kappa)).rsample((500,))
    assert z.dtype == torch.float32 and z.shape == (500, 4, m)
    assert torch.isfinite(z).all() and ((z.norm(dim=-1) - 1).abs() < 1e-5).all()


def test_uniform_samples_and_density():
    p = HypersphericalUniform(5, dtype=torch.float64)
    z = p.rsample((20_000,), noise=SeededNoise(seed=0))
    assert p.batch_shape == () and p.event_shape == (5,)
    assert ((z.norm(dim=-1) - 1).abs() < 1e-12).all()
    assert (z.mean(0).abs() <= 5 * z.std(0) / math.sqrt(20_000)).all()
    assert_sample_variance(z, p.variance)  # E[z] = 0 and Var[z_i] = 1/m, for an expanded batch too
    wide = p.expand(torch.Size([3]))
    assert torch.equal(wide.mean, torch.zeros(3, 5, dtype=torch.float64))
    assert torch.equal(wide.variance, torch.full((3, 5), 0.2, dtype=torch.float64))
    area = 2 * math.pi ** 2.5 / math.gamma(2.5)
    assert torch.allclose(p.log_prob(z[:3]), torch.full((3,), -math.log(area), dtype=torch.float64))
    assert math.isclose(float(p.entropy()), math.log(area)) and math.isclose(log_sphere_area(5), math.log(area))
    like = torch.zeros((), dtype=torch.float32)
    assert HypersphericalUniform(3, like=like).sample((2,)).dtype == torch.float32


# ------------------------------------------------------------------------------------------ densities and the KL


@pytest.mark.parametrize("kappa", [0.5, 5.0, 50.0])
def test_density_integrates_to_one_on_s2(kappa):
    # Gauss-Legendre in theta (the integrand is smooth in theta) and the trapezoid rule in the periodic phi
    nodes, weights = np.polynomial.legendre.leggauss(200)
    theta, w_theta = torch.tensor(math.pi / 2 * (nodes + 1)), torch.tensor(math.pi / 2 * weights)
    phi = torch.arange(400, dtype=torch.float64) * (2 * math.pi / 400)
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    z = torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], -1)  # (200, 400, 3)
    q = VonMisesFisher(random_loc(3, seed=1), torch.tensor([kappa], dtype=torch.float64))
    density = q.log_prob(z).exp() * t.sin()  # surface element sin(theta) dtheta dphi
    total = (density * w_theta[:, None]).sum() * (2 * math.pi / 400)
    assert abs(float(total) - 1) < 1e-9


@pytest.mark.parametrize("kappa", [0.5, 5.0, 50.0])
def test_density_integrates_to_one_on_s1(kappa):
    angle = torch.arange(4000, dtype=torch.float64) * (2 * math.pi / 4000)
    z = torch.stack([angle.cos(), angle.sin()], -1)
    q = VonMisesFisher(random_loc(2, seed=2), torch.tensor([kappa], dtype=torch.float64))
    assert abs(float(q.log_prob(z).exp().sum() * (2 * math.pi / 4000)) - 1) < 1e-9


@pytest.mark.parametrize("m,kappa", [(2, 1.0), (3, 5.0), (10, 0.3), (10, 20.0), (64, 100.0)])
def test_kl_and_entropy_match_monte_carlo(m, kappa):
    n = 20_000
    q = VonMisesFisher(random_loc(m, seed=3), torch.tensor([kappa], dtype=torch.float64))
    p = HypersphericalUniform(m, dtype=torch.float64)
    z = q.rsample((n,), noise=SeededNoise(seed=m))
    log_q = q.log_prob(z)
    log_ratio = log_q - p.log_prob(z)
    kl = kl_divergence(q, p)
    assert kl.shape == ()
    assert abs(log_ratio.mean() - kl) <= 5 * log_ratio.std() / math.sqrt(n)
    assert abs(-log_q.mean() - q.entropy()) <= 5 * log_q.std() / math.sqrt(n)
    assert torch.allclose(kl, -q.entropy() + p.entropy())


def test_kl_positive_and_independent_of_loc():
    for m in (2, 3, 16, 128):
        kappa = torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3, 1e5], dtype=torch.float64)[:, None]
        p = HypersphericalUniform(m, dtype=torch.float64)
        kls = [kl_divergence(VonMisesFisher(random_loc(m, seed=s, batch=(6,)), kappa), p) for s in range(3)]
        assert (kls[0] > 0).all() and torch.isfinite(kls[0]).all()
        assert torch.allclose(kls[0], kls[1]) and torch.allclose(kls[0], kls[2])
        assert (kls[0].diff() > 0).all()  # more concentrated, further from uniform
        kl32 = kl_divergence(VonMisesFisher(random_loc(m, 0, (6,)).float(), kappa.float()), HypersphericalUniform(m))
        assert (kl32 > 0).all() and torch.allclose(kl32.double(), kls[0], rtol=1e-6)


def test_kl_is_never_negative_at_the_smallest_kappa():
    """At --kappa 1e-8 (the smallest config allows) the KL read -4e-16 .. -2e-13: rounding, printed as a sign."""
    for m in (2, 3, 16, 64, 128):
        kappa = torch.tensor([1e-8, 1e-6, 1e-4])[:, None]
        kl = kl_divergence(VonMisesFisher(random_loc(m, 0, (3,)).float(), kappa), HypersphericalUniform(m))
        assert (kl >= 0).all() and (kl < 1e-8).all(), (m, kl)


def test_log_prob_broadcasts_over_samples():
    q = VonMisesFisher(random_loc(4, seed=0, batch=(5,)), torch.rand(5, 1, dtype=torch.float64) + 0.5)
    p = HypersphericalUniform(4, dtype=torch.float64)
    z = q.rsample((7,))
    assert q.log_prob(z).shape == (7, 5) and p.log_prob(z).shape == (7, 5)
    assert q.log_prob(z[:, :1]).shape == (7, 5)  # one code against every posterior
    assert q.log_prob(z[0][:, None]).shape == (5, 5)
    assert q.entropy().shape == (5,) and q.mean.shape == (5, 4)


# ---------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [2, 3, 16, 64])
def test_rsample_gradients_are_finite(m, dtype):
    kappas = [1e-3, 1e-1, 1.0, 10.0, 1e3, 1e4]
    loc = random_loc(m, seed=m, batch=(len(kappas),)).to(dtype).requires_grad_(True)
    kappa = torch.tensor(kappas, dtype=dtype)[:, None].requires_grad_(True)
    z = VonMisesFisher(loc, kappa).rsample((64,))
    z.sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(kappa.grad).all()
    kl = kl_divergence(VonMisesFisher(loc, kappa), HypersphericalUniform(m, like=loc))
    (d_kl,) = torch.autograd.grad(kl.sum(), kappa)
    assert torch.isfinite(d_kl).all() and (d_kl > 0).all()  # KL rises with kappa


@pytest.mark.parametrize("m", [2, 3, 7])
def test_rsample_at_loc_plus_minus_e1(m):
    # The Householder vector e_1 - loc vanishes at loc = e_1; the sampler must still give loc-centred, finite results.
    e1 = torch.zeros(m, dtype=torch.float64)
    e1[0] = 1
    loc = torch.stack([e1, -e1]).requires_grad_(True)
    kappa = torch.full((2, 1), 50.0, dtype=torch.float64, requires_grad=True)
    z = VonMisesFisher(loc, kappa).rsample((2000,), noise=SeededNoise(seed=3))
    assert (z.mean(0)[:, 0] * torch.tensor([1.0, -1.0], dtype=torch.float64) > 0.9).all()
    z.sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(kappa.grad).all()


def test_arguments_are_validated():
    with pytest.raises(ValueError):
        VonMisesFisher(torch.ones(3), torch.ones(1), validate_args=True)  # loc not a unit vector
    with pytest.raises(ValueError):
        VonMisesFisher(F.normalize(torch.ones(3), dim=0), -torch.ones(1), validate_args=True)
    with pytest.raises(ValueError):
        HypersphericalUniform(1)


@pytest.mark.parametrize("kappa", [0.5, 2.0, 10.0])
def test_reparameterised_kappa_gradient_is_exact_on_s2(kappa):
    estimate, stderr, exact = kappa_gradient(3, kappa, 20_000, corrected=False, seed=5)
    assert abs(estimate - exact) <= 5 * stderr


@pytest.mark.parametrize("m,kappa", [(2, 1.0), (2, 10.0), (10, 1.0), (10, 10.0), (64, 10.0)])
def test_reparameterised_kappa_gradient_sign_and_magnitude(m, kappa):
    # Without the rejection-sampling correction term (Naesseth et al. 2017) the estimate is biased low where
    # proposals are often rejected: measured ratios 0.56 (m=2, kappa=1) to 1.0 (m=64).
    estimate, stderr, exact = kappa_gradient(m, kappa, 5_000 if m > 10 else 20_000, corrected=False, seed=5)
    assert exact > 0 and 0.4 * exact - 5 * stderr < estimate < 1.05 * exact + 5 * stderr


@pytest.mark.parametrize("m,kappa", [(2, 1.0), (2, 10.0), (5, 2.0), (10, 1.0), (10, 10.0), (64, 10.0)])
def test_the_score_makes_the_kappa_gradient_unbiased(m, kappa):
    # g_rep + g_cor (Naesseth et al. 2017) against the exact A_m'(kappa) <a, loc>, where rsample's g_rep alone
    # is 0.56x (m=2, kappa=1) to 0.99x of it; the correction's value is 0
    estimate, stderr, exact = kappa_gradient(m, kappa, 40_000, corrected=True, seed=5)
    assert abs(estimate - exact) <= 5 * stderr and stderr < 0.05 * abs(exact)


@dataclasses.dataclass
class Draws:
    """What elbo and iwae read of a forward pass with K samples: log p(x|z) = f = <a, z>, no KL, the scores."""
    f: torch.Tensor  # (K, n)
    score: torch.Tensor  # (K, n)

    @property
    def k(self) -> int:
        return self.f.shape[0]

    def log_px_z(self, x: torch.Tensor) -> torch.Tensor:
        return self.f

    def log_pz(self) -> torch.Tensor:
        return torch.zeros_like(self.f)

    log_qz = log_pz

    def kl(self) -> torch.Tensor:
        return torch.zeros_like(self.f[0])


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_the_objectives_kappa_gradients_with_several_samples_are_unbiased(objective):
    """Against the score-function estimate of the same expectation (unbiased, its own draws' variance): IWAE's
    bound is one function of the K draws, whose scores add up (their mean left 1 - 1/K of the correction out);
    the K-sample ELBO's baseline for each draw is the mean of the others (with its own in, 1/K was lost)."""
    m, kappa0, n, k = 2, 1.0, 20_000, 3  # on S^1 the correction is ~45% of the gradient
    loc, a = random_loc(m, seed=0), random_loc(m, seed=1)
    kappa = torch.full((n, 1), kappa0, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(2)
    q = VonMisesFisher(loc.expand(n, m), kappa)
    z, score = q.rsample_and_score((k,))  # (K, n, m), (K, n)
    out = Draws(f=z @ a, score=score)
    terms = (elbo if objective == "elbo" else iwae)(out, None)
    (estimate,) = torch.autograd.grad(-terms["loss"].sum(), kappa)
    value = out.f.mean(0) if objective == "elbo" else torch.logsumexp(out.f, 0) - math.log(k)  # (n,)
    (reference,) = torch.autograd.grad((value.detach() * q.log_prob(z.detach()).sum(0)).sum(), kappa)
    difference = (estimate - reference).flatten()
    assert abs(float(difference.mean())) < 4 * float(difference.std()) / math.sqrt(n)


def test_the_estimates_share_their_draws_and_the_correction_changes_only_the_gradient():
    """benchmarks/vmf_gradient.py's table compares the two estimates on the same draws: where no proposal
    can be rejected (S^2) they are one and the same number."""
    assert kappa_gradient(3, 2.0, 2_000, corrected=False, seed=1) == kappa_gradient(3, 2.0, 2_000, corrected=True,
                                                                                    seed=1)
    rep, cor = (kappa_gradient(5, 2.0, 2_000, corrected=c, seed=1) for c in (False, True))
    assert rep[2] == cor[2] and rep[0] != cor[0]


def test_a_score_only_where_kappa_needs_a_gradient_through_rejection():
    kappa = torch.ones(4, 1, dtype=torch.float64, requires_grad=True)
    z, score = VonMisesFisher(random_loc(3, seed=1, batch=(4,)), kappa).rsample_and_score((2,))
    assert z.shape == (2, 4, 3) and score is None  # S^2: w by its exact inverse CDF
    z, score = VonMisesFisher(random_loc(5, seed=1, batch=(4,)), kappa).rsample_and_score((2,))
    assert z.shape == (2, 4, 5) and score.shape == (2, 4) and score.requires_grad
    assert VonMisesFisher(random_loc(5, seed=1, batch=(4,)), kappa.detach()).rsample_and_score()[1] is None


# -------------------------------------------------------------------------------------------------------- noise


def test_noise_makes_samples_reproducible_and_is_the_only_randomness():
    q = VonMisesFisher(random_loc(6, seed=0, batch=(3,)), torch.tensor([[0.5], [5.0], [500.0]], dtype=torch.float64))
    state = torch.get_rng_state()
    first, noise = q.rsample((4, 2), noise=SeededNoise(seed=11)), SeededNoise(seed=11)
    assert torch.equal(first, q.rsample((4, 2), noise=noise))
    assert torch.equal(torch.get_rng_state(), state)
    assert noise.shapes and all(shape[:3] == (4, 2, 3) for shape in noise.shapes)
    assert not torch.equal(first, q.rsample((4, 2), noise=SeededNoise(seed=12)))
    q3 = VonMisesFisher(random_loc(3, seed=0), torch.ones(1, dtype=torch.float64))
    assert torch.equal(q3.rsample((5,), noise=SeededNoise(1)), q3.rsample((5,), noise=SeededNoise(1)))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("m", [3, 5])
def test_keyed_noise_gives_the_same_samples_in_any_chunking(m):
    # A sample's draws depend on its own noise alone, so evaluating K samples in chunks changes nothing.
    from vaelab.density import KeyedNoise

    q = VonMisesFisher(random_loc(m, seed=0, batch=(3,)), torch.tensor([[0.2], [3.0], [300.0]], dtype=torch.float64))
    keyed = KeyedNoise(seed=0, first=0, batch=3, k=40, device=torch.device("cpu"))
    whole = VMFLatent.rsample(q, 40, keyed.samples(0))
    chunks = [VMFLatent.rsample(q, 10, keyed.samples(i)) for i in range(0, 40, 10)]
    assert torch.allclose(whole, torch.cat(chunks).to(whole), atol=1e-6)


# ------------------------------------------------------------------------------------------------ latent module


def test_vmf_latent_shapes_and_fixed_kappa_kl():
    torch.manual_seed(0)
    latent = VMFLatent(in_features=8, latent_dim=5, kappa=20.0)
    qz, pz = latent(torch.randn(6, 8)), latent.prior()
    assert qz.batch_shape == (6,) and qz.event_shape == (5,) and pz.event_shape == (5,)
    z1, zk = latent.rsample(qz), latent.rsample(qz, 3)
    assert z1.shape == (6, 5) and zk.shape == (3, 6, 5)
    assert qz.log_prob(zk).shape == (3, 6) and pz.log_prob(zk).shape == (3, 6)
    kl = kl_divergence(qz, pz)
    assert kl.shape == (6,) and (kl > 0).all() and torch.allclose(kl, kl[:1].expand(6))
    assert torch.allclose(qz.mean.norm(dim=-1), bessel_iv_ratio(1.5, torch.tensor(20.0)).expand(6))
    noise = SeededNoise(seed=0, dtype=torch.float32)
    assert latent.rsample(qz, noise=noise).shape == (6, 5) and noise.shapes[0][:2] == (1, 6)


def test_vmf_latent_rsample_draws_what_rsample_and_score_draws():
    torch.manual_seed(0)
    latent = VMFLatent(in_features=8, latent_dim=5)  # learned kappa: rsample_and_score has a score
    qz = latent(torch.randn(6, 8))
    for k in (None, 3):
        z = latent.rsample(qz, k, noise=SeededNoise(seed=1, dtype=torch.float32))
        z_scored, score = latent.rsample_and_score(qz, k, noise=SeededNoise(seed=1, dtype=torch.float32))
        assert torch.equal(z, z_scored) and score.shape == z.shape[:-1]


def test_vmf_latent_learned_kappa_gets_gradients():
    torch.manual_seed(0)
    latent = VMFLatent(in_features=8, latent_dim=4)
    qz = latent(torch.randn(6, 8))
    assert (qz.scale > 1).all()  # softplus + 1
    z = latent.rsample(qz, 2)
    (z[..., 0].sum() + kl_divergence(qz, latent.prior()).sum()).backward()
    for p in latent.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_objectives_add_the_correction_to_kappa_alone_and_keep_their_values():
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=5, hidden=(8,), latent="vmf")
    x = torch.rand(6, 1, 4, 4)
    out = model(x)
    assert out.score is not None and out.score.shape == (6,)
    terms, plain = elbo(out, x, beta=0.5), elbo(dataclasses.replace(out, score=None), x, beta=0.5)
    torch.testing.assert_close(terms["loss"], terms["recon"] + 0.5 * terms["kl"], rtol=0, atol=0)
    heads = [model.posterior.mu.weight, model.posterior.kappa_head.weight]
    g = torch.autograd.grad(terms["loss"].sum(), heads, retain_graph=True)
    g0 = torch.autograd.grad(plain["loss"].sum(), heads, retain_graph=True)
    assert torch.equal(g[0], g0[0]) and not torch.allclose(g[1], g0[1])  # the score depends on kappa only
    # with one sample, IWAE is the ELBO with the Monte Carlo KL in value and, correction included, in gradient
    out1 = model(x, k=1)
    a, b = iwae(out1, x)["loss"], elbo(out1, x, kl="mc")["loss"]
    torch.testing.assert_close(a, b)
    for ga, gb in zip(torch.autograd.grad(a.sum(), heads, retain_graph=True), torch.autograd.grad(b.sum(), heads)):
        torch.testing.assert_close(ga, gb)


def test_a_lone_example_s_sampler_correction_has_no_baseline_and_stays_finite():
    """One example with one sample (--batch-size 1, or an epoch's tail batch of one, which only batch-norm models
    skip) has no other draw to take a baseline from: the correction is f's plain score term, where a baseline of
    0 / 0 would make the loss and every gradient NaN."""
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=5, hidden=(8,), latent="vmf")
    x = torch.rand(1, 1, 4, 4)
    for out, objective in ((model(x), elbo), (model(x, k=1), iwae)):
        loss = objective(out, x)["loss"]
        (grad,) = torch.autograd.grad(loss.sum(), [model.posterior.kappa_head.weight])
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and grad.abs().sum() > 0, objective.__name__


def test_vmf_latent_moves_to_double():
    latent = VMFLatent(in_features=3, latent_dim=3, kappa=5.0).double()
    qz, pz = latent(torch.randn(2, 3, dtype=torch.float64)), latent.prior()
    z = latent.rsample(qz, 4)
    assert z.dtype == qz.mean.dtype == pz.sample().dtype == kl_divergence(qz, pz).dtype == torch.float64
    assert qz.log_prob(z).dtype == pz.log_prob(z).dtype == torch.float64


def test_vmf_latent_rejects_bad_config():
    with pytest.raises(ValueError, match="latent_dim"):
        VMFLatent(in_features=3, latent_dim=1)
    with pytest.raises(ValueError, match="kappa"):
        VMFLatent(in_features=3, latent_dim=3, kappa=0.0)
