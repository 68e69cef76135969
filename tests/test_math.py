"""The mathematics: KL, reparameterisation, likelihoods, ELBO, PCA and the linear AE."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

from vaelab.config import ModelConfig
from vaelab.errors import ConfigError
from vaelab.latents import DiagonalGaussian, StandardNormal, diagonal_normal, standard_normal
from vaelab.likelihoods import SCALE_MIN, BernoulliLikelihood, GaussianLikelihood
from vaelab.models import AE, PCA, VAE
from vaelab.objectives import elbo, reconstruction


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    loc, scale = torch.randn(4, 5), torch.rand(4, 5) + 0.3
    qz, pz = diagonal_normal(loc, scale), diagonal_normal(torch.zeros(5), torch.ones(5))
    analytic = kl_divergence(qz, pz)  # (4,)
    z = qz.sample((200_000,))  # (K, B, D)
    mc = (qz.log_prob(z) - pz.log_prob(z)).mean(0)
    closed = 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log()).sum(-1)  # Kingma & Welling, Appendix B
    torch.testing.assert_close(analytic, closed)
    # the MC standard error is about sqrt(Var/K) ~ 0.01 here
    assert torch.allclose(analytic, mc, atol=0.05), (analytic, mc)


@pytest.mark.parametrize("stored_logvar", [True, False])
def test_kl_against_the_standard_normal_prior_equals_torchs_normal_kl(stored_logvar):
    """The registered DiagonalNormal-StandardNormal KL: same values and gradients as torch's Normal-Normal KL."""
    torch.manual_seed(0)
    loc, logvar = torch.randn(6, 5, requires_grad=True), (3 * torch.randn(6, 5)).requires_grad_()
    scale = torch.exp(0.5 * logvar)
    qz = diagonal_normal(loc, scale, logvar if stored_logvar else None)
    pz = standard_normal(torch.zeros(5), torch.ones(5))
    assert isinstance(pz, StandardNormal) and isinstance(qz, Independent)
    ours = kl_divergence(qz, pz)
    generic = kl_divergence(Independent(Normal(loc, scale), 1), Independent(Normal(torch.zeros(5), torch.ones(5)), 1))
    torch.testing.assert_close(ours, generic)
    grads = torch.autograd.grad(ours.sum(), (loc, logvar), retain_graph=True)
    torch.testing.assert_close(grads, torch.autograd.grad(generic.sum(), (loc, logvar)))
    # expand keeps the class and the log-variance, so the fast KL still applies to an expanded posterior
    wide = qz.expand((2, 6))
    assert type(wide) is type(qz) and wide.batch_shape == (2, 6)
    torch.testing.assert_close(kl_divergence(wide, pz), ours.expand(2, 6))


def test_reparameterised_samples_have_right_moments_and_carry_gradients():
    torch.manual_seed(0)
    head = DiagonalGaussian(in_features=3, latent_dim=2)
    h = torch.randn(1, 3)
    qz = head(h)
    z = qz.rsample((100_000,))  # (K, 1, 2)
    torch.testing.assert_close(z.mean(0), qz.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), qz.stddev, atol=0.02, rtol=0)
    z.sum().backward()
    assert head.mean.weight.grad is not None and head.mean.weight.grad.abs().sum() > 0
    assert head.logvar.weight.grad is not None and head.logvar.weight.grad.abs().sum() > 0


def test_log_variance_clamp_keeps_the_value_in_range_and_the_gradient():
    """A unit whose log-variance overshoots a bound is clamped there, and the KL still pulls it back: a hard clamp's
    zero gradient had left it beyond the bound for good."""
    from vaelab.latents import LOGVAR_MAX, LOGVAR_MIN

    head = DiagonalGaussian(in_features=3, latent_dim=2)
    with torch.no_grad():
        head.logvar.weight.zero_()
        head.logvar.bias.copy_(torch.tensor([LOGVAR_MIN - 5, LOGVAR_MAX + 5]))
    qz = head(torch.randn(4, 3))
    torch.testing.assert_close(qz.logvar, torch.tensor([LOGVAR_MIN, LOGVAR_MAX]).expand(4, 2))
    torch.testing.assert_close(qz.stddev, torch.tensor([LOGVAR_MIN, LOGVAR_MAX]).div(2).exp().expand(4, 2))
    kl_divergence(qz, head.prior()).sum().backward()
    # d KL / d logvar = (exp(logvar) - 1) / 2 at the clamped value, per example: up from the floor, down from the top
    expected = 4 * 0.5 * (torch.tensor([LOGVAR_MIN, LOGVAR_MAX]).exp() - 1)
    torch.testing.assert_close(head.logvar.bias.grad, expected)


def test_bernoulli_log_likelihood_by_hand():
    logits = torch.tensor([[[[0.3, -1.2], [2.0, 0.0]]]])  # (1, 1, 2, 2)
    x = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    p = torch.sigmoid(logits)
    by_hand = (x * p.log() + (1 - x) * (1 - p).log()).sum()
    px = BernoulliLikelihood()(logits)
    assert px.batch_shape == (1,) and px.event_shape == (1, 2, 2)
    torch.testing.assert_close(px.log_prob(x), by_hand.reshape(1))
    torch.testing.assert_close(px.mean, p)
    # the two code paths (same shape: fused BCE; K samples against one image: broadcast) agree with
    # torch's Bernoulli in values and gradients, also for extreme logits and grey targets
    torch.manual_seed(0)
    wide = (torch.randn(3, 2, 1, 4, 4) * 30).requires_grad_()
    grey = torch.rand(2, 1, 4, 4)
    fast = BernoulliLikelihood()(wide)
    ours = fast.log_prob(grey)  # broadcast path
    same = fast.log_prob(grey.expand(3, -1, -1, -1, -1))  # fused path
    ref = torch.distributions.Bernoulli(logits=wide, validate_args=False).log_prob(grey.expand(3, -1, -1, -1, -1))
    ref = ref.flatten(-3).sum(-1)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(same, ref)
    grads = [torch.autograd.grad(v.sum(), wide, retain_graph=True)[0] for v in (ours, same, ref)]
    torch.testing.assert_close(grads[0], grads[2])
    torch.testing.assert_close(grads[1], grads[2])


@pytest.mark.parametrize("learned", [False, True])
def test_gaussian_log_likelihood_by_hand(learned):
    mean = torch.tensor([[[[0.2, 0.5], [0.9, 0.1]]]])
    x = torch.tensor([[[[0.0, 0.4], [1.0, 0.3]]]])
    lik = GaussianLikelihood(sigma=0.25, channels=1, learned=learned)
    sigma = 0.25
    by_hand = (-0.5 * ((x - mean) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).sum()
    torch.testing.assert_close(lik(mean).log_prob(x), by_hand.reshape(1), rtol=1e-5, atol=1e-5)
    if learned:  # the scale is a parameter that gets gradients, and never drops below its floor
        lik(mean).log_prob(x).sum().backward()
        assert lik.raw_scale.grad is not None
        with torch.no_grad():
            lik.raw_scale.fill_(-50.0)
        assert float(lik.scale().detach().min()) >= SCALE_MIN


def test_a_learned_scale_starts_at_any_sigma_above_its_floor(tmp_path):
    """log(expm1(sigma)) overflowed above 709.78 (an OverflowError from --sigma 1000); a sigma at or below the floor
    started at the floor without a word."""
    for sigma in (0.0011, 0.25, 1000.0, 1e30):
        scale = float(GaussianLikelihood(sigma=sigma, channels=1, learned=True).scale().detach().flatten()[0])
        assert scale == pytest.approx(sigma, rel=1e-5)
    from vaelab.config import DataConfig, RunConfig, TrainConfig
    from vaelab.train import train

    for sigma in (SCALE_MIN, 1e-6):  # refused for a new run; a stored one (its scale is in its weights) loads
        config = RunConfig(data=DataConfig(name="digits"), train=TrainConfig(epochs=1),
                           model=ModelConfig(likelihood="gaussian-learned", sigma=sigma, hidden=(8,), latent_dim=2))
        with pytest.raises(ConfigError, match=r"--sigma .* never drops below its floor 0.001"):
            train(config, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_elbo_terms_are_consistent_and_bound_log_likelihood_of_a_batch():
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,))
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.3))
    out = model(x)
    terms = elbo(out, x, beta=0.5)
    assert all(v.shape == (5,) for v in terms.values())
    torch.testing.assert_close(terms["loss"], terms["recon"] + 0.5 * terms["kl"])
    assert (terms["kl"] >= 0).all() and (terms["recon"] >= 0).all()
    torch.testing.assert_close(terms["recon"], -out.px_z.log_prob(x))


def test_decode_accepts_importance_sample_dimension():
    model = VAE(input_shape=(1, 8, 8), latent_dim=2, net="conv", hidden=(4, 8))
    z = torch.randn(7, 3, 2)  # (K, B, D)
    px = model.decode(z)
    assert px.batch_shape == (7, 3) and px.event_shape == (1, 8, 8)
    out = model(torch.rand(3, 1, 8, 8), k=7)
    assert out.z.shape == (7, 3, 2) and out.px_z.batch_shape == (7, 3)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 9, 13), (1, 8, 8)])
def test_conv_decoder_restores_any_image_size(shape):
    model = VAE(input_shape=shape, latent_dim=2, net="conv", hidden=(4, 8))
    x = torch.rand(2, *shape)
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(3).shape == (3, *shape)


def _principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles between the column spaces of a and b (P, L), in radians."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)
    return torch.arccos(cosines)


def test_pca_matches_numpy_svd_and_ppca_noise():
    torch.manual_seed(0)
    x = torch.randn(300, 1, 3, 4) @ torch.randn(4, 4)
    pca = PCA(input_shape=(1, 3, 4), latent_dim=3).fit(x)
    flat = x.flatten(1).double()
    centred = flat - flat.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    angles = _principal_angles(pca.components.double().T, vh[:3].T)
    assert angles.max() < 1e-4
    eig = s**2 / len(flat)  # of the maximum-likelihood covariance (1/N)
    torch.testing.assert_close(pca.explained_variance.double(), eig[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pca.noise_variance.double(), eig[3:].mean(), rtol=1e-5, atol=1e-6)
    # projecting twice changes nothing, and components are orthonormal
    recon = pca.reconstruct(x)
    torch.testing.assert_close(pca.reconstruct(recon), recon, atol=1e-4, rtol=0)
    torch.testing.assert_close(pca.components @ pca.components.T, torch.eye(3), atol=1e-5, rtol=0)


def test_linear_autoencoder_spans_pca_subspace():
    """Baldi & Hornik 1989: a linear AE trained on squared error recovers the principal subspace."""
    torch.manual_seed(0)
    n, p, latent = 512, 12, 3
    scales = torch.tensor([5.0, 4.0, 3.0] + [0.3] * (p - 3))
    basis, _ = torch.linalg.qr(torch.randn(p, p))
    x = ((torch.randn(n, p) * scales) @ basis.T + 0.5).reshape(n, 1, 1, p)
    pca = PCA(input_shape=(1, 1, p), latent_dim=latent).fit(x)
    ae = AE(input_shape=(1, 1, p), latent_dim=latent, hidden=(), likelihood="gaussian", sigma=1.0, linear=True)
    opt = torch.optim.Adam(ae.parameters(), lr=0.02)
    for _ in range(1500):
        loss = reconstruction(ae(x), x)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    decoder_weight = ae.decoder.body.body[0].weight.detach()  # (P, L): its columns span the AE's subspace
    angles = _principal_angles(decoder_weight, pca.components.T)
    assert angles.max() < 0.02, angles
    # and it reconstructs as well as PCA does
    pca_err = (pca.reconstruct(x) - x).pow(2).sum() / n
    ae_err = (ae.reconstruct(x) - x).pow(2).sum() / n
    assert ae_err < pca_err * 1.01


def test_bernoulli_elbo_matches_pytorch_examples_formula():
    """Our ELBO equals the familiar hand-written loss (BCE summed + closed-form KL) on the same sample."""
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=2, hidden=(6,))
    x = torch.rand(3, 1, 4, 4)
    torch.manual_seed(1)
    terms = elbo(model(x), x)
    torch.manual_seed(1)
    qz = model.encode(x)
    mu, logvar = qz.mean, qz.variance.log()
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    logits = model.decoder.body(z).reshape(3, 1, 4, 4)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
    torch.testing.assert_close(terms["loss"], bce + kld, rtol=1e-5, atol=1e-5)


def test_mlp_puts_relu_after_hidden_layers_only_and_none_in_a_linear_net():
    from torch.nn import Linear, ReLU

    from vaelab.nets import mlp

    def kinds(net):
        return "".join("L" if isinstance(m, Linear) else "R" if isinstance(m, ReLU) else "?" for m in net)
    assert kinds(mlp([5, 7, 6, 3])) == "LRLRL"
    assert kinds(mlp([5, 7, 6, 3], last_activation=True)) == "LRLRLR"
    assert kinds(mlp([5, 7, 6, 3], linear=True)) == kinds(mlp([5, 7, 6, 3], linear=True, last_activation=True)) == "LLL"
    ae = AE(input_shape=(1, 4, 4), latent_dim=2, hidden=(6, 5), likelihood="gaussian", sigma=1.0, linear=True)
    assert not any(isinstance(m, ReLU) for m in ae.modules())
    torch.manual_seed(0)
    logits = VAE(input_shape=(1, 4, 4), latent_dim=2, hidden=(6,)).decode(torch.randn(64, 2)).base_dist.logits
    assert logits.min() < 0 < logits.max()  # no activation after the decoder's last layer


def test_squeeze_excite_gates_channels_by_their_spatial_means():
    """x * sigmoid(W2 relu(W1 mean_hw(x))) (Hu et al. 2018), computed by hand from the cell's weights."""
    from vaelab.hvae_cells import SqueezeExcite

    torch.manual_seed(0)
    se = SqueezeExcite(8)
    x = torch.randn(2, 8, 3, 5)
    first, second = se.gate[0], se.gate[2]
    context = x.mean((2, 3))
    gate = torch.sigmoid(torch.relu(context @ first.weight.T + first.bias) @ second.weight.T + second.bias)
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_gated_units_compute_a_times_sigmoid_b():
    from vaelab.nets import GatedLinear

    torch.manual_seed(0)
    layer = GatedLinear(5, 3)
    x = torch.randn(4, 5)
    a = x @ layer.proj.weight[:3].T + layer.proj.bias[:3]
    b = x @ layer.proj.weight[3:].T + layer.proj.bias[3:]
    torch.testing.assert_close(layer(x), a * torch.sigmoid(b))
    model = VAE(input_shape=(1, 8, 8), latent_dim=2, hidden=(6, 4), activation="gated")
    assert model.reconstruct(torch.rand(3, 1, 8, 8)).shape == (3, 1, 8, 8)
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
