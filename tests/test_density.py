"""Importance-sampled log p(x), IWAE, and the evaluation suite, checked against closed forms."""
import dataclasses
import html
import json
import math

import numpy as np
import pytest
import torch
from test_train import eight_bit
from torch.distributions import MultivariateNormal, kl_divergence

from vaelab import latent_stats, runs
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import Dataset, Split, dequantize
from vaelab.density import importance_sample, log_likelihood, mean_and_stderr, nll_summary
from vaelab.errors import InputError
from vaelab.evaluate import EVALUATION_FORMAT, compare_runs, evaluate_run
from vaelab.latent_stats import active_units, mutual_information, mutual_information_bounds
from vaelab.latents import DiagonalNormal
from vaelab.models import AE, PCA, VAE
from vaelab.objectives import elbo, iwae
from vaelab.train import train

P, D, S = 6, 2, 0.5  # pixels, latent size, noise scale of the linear-Gaussian model


def ppca(seed=0):
    """Probabilistic PCA as a linear VAE, x|z ~ N(Wz + b, S^2 I), with the exact posterior as encoder.

    W has orthogonal columns, so M = W^T W + S^2 I is diagonal and the exact posterior
    N(M^-1 W^T (x - b), S^2 M^-1) is a diagonal Gaussian the encoder heads can represent exactly.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(P, D, generator=g))
    w = q * torch.tensor([2.0, 1.2])
    b = torch.randn(P, generator=g) * 0.3
    model = VAE(input_shape=(1, 1, P), latent_dim=D, hidden=(), likelihood="gaussian", sigma=S, linear=True)
    m = w.T @ w + S**2 * torch.eye(D)
    with torch.no_grad():
        model.decoder.body.body[0].weight.copy_(w)
        model.decoder.body.body[0].bias.copy_(b)
        a = torch.linalg.solve(m, w.T)  # M^-1 W^T
        model.posterior.mean.weight.copy_(a)
        model.posterior.mean.bias.copy_(-a @ b)
        model.posterior.logvar.weight.zero_()
        model.posterior.logvar.bias.copy_(torch.log(S**2 / torch.diagonal(m)))
    exact = MultivariateNormal(b, w @ w.T + S**2 * torch.eye(P))
    x = exact.sample((64,)).reshape(64, 1, 1, P)
    return model.eval(), x, exact.log_prob(x.reshape(64, P))


def test_exact_posterior_makes_the_estimate_exact_for_every_k():
    model, x, exact = ppca()
    for k in (1, 7, 100):
        torch.testing.assert_close(log_likelihood(model, x, k=k), exact, rtol=0, atol=2e-4)


def perturbed(model):
    """The same model with a worse proposal: shifted means and wider posteriors."""
    with torch.no_grad():
        model.posterior.mean.bias.add_(0.4)
        model.posterior.logvar.bias.add_(0.8)
    return model


def test_bound_is_below_exact_and_rises_towards_it_with_k():
    model, x, exact = ppca()
    model = perturbed(model)
    gaps = []
    for k in (1, 10, 100, 1000):  # each the mean of 8 estimates: at K = 1000 one estimate's noise (~0.006 nats
        seeds = range(1, 9)  # over these 64 examples) exceeds the gap it has in expectation (~0.004)
        gaps.append(sum(float((exact - log_likelihood(model, x, k=k, seed=s)).mean()) for s in seeds) / len(seeds))
    assert all(g > 0 for g in gaps), gaps  # below the exact value
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3], gaps  # and rising towards it
    assert gaps[-1] < 0.05 * gaps[0]


def test_learned_proposal_is_below_exact_and_tightens():
    """Learn the posterior means from data of the model, with variances held too wide: an imperfect proposal."""
    model, x, exact = ppca()
    torch.manual_seed(0)
    model.posterior.mean.reset_parameters()
    with torch.no_grad():
        model.posterior.logvar.bias.add_(1.5)
    model.decoder.requires_grad_(False)
    model.posterior.logvar.requires_grad_(False)
    opt = torch.optim.Adam(model.posterior.mean.parameters(), lr=0.05)
    model.train()
    for _ in range(150):
        loss = elbo(model(x), x)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    gaps = [float(exact.mean() - log_likelihood(model, x, k=k, seed=2).mean()) for k in (1, 3, 10, 1000)]
    assert gaps[0] > gaps[1] > gaps[2] > 0.02, gaps  # below the exact value, rising with K
    assert abs(gaps[3]) < 0.02, gaps  # and at K=1000 equal to it within the estimate's noise (~0.005)


def test_iwae_with_one_sample_equals_the_single_sample_elbo():
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,))
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.4))
    out = model(x, k=1)
    torch.testing.assert_close(iwae(out, x)["loss"], elbo(out, x, kl="mc")["loss"], rtol=0, atol=0)
    # in expectation it is the analytic-KL ELBO: the Monte Carlo KL averages to the analytic one
    out = model(x, k=20000)
    torch.testing.assert_close(elbo(out, x, kl="mc")["kl"], elbo(out, x)["kl"], atol=0.05, rtol=0)
    # and more samples give a tighter (smaller) loss on average
    assert iwae(out, x)["loss"].mean() < elbo(out, x, kl="mc")["loss"].mean()


def test_estimates_are_reproducible_and_independent_of_chunk_and_batch_size():
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,)).eval()
    x = torch.bernoulli(torch.full((11, 1, 4, 4), 0.4))
    reference = log_likelihood(model, x, k=50, chunk=50, seed=3)
    torch.testing.assert_close(log_likelihood(model, x, k=50, chunk=50, seed=3), reference, rtol=0, atol=0)
    for chunk, batch_size in ((7, 11), (1, 4), (13, 1), (49, 3)):  # 50 is no multiple of 7, 13 or 49
        got = log_likelihood(model, x, k=50, chunk=chunk, batch_size=batch_size, seed=3)
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(log_likelihood(model, x, k=50, seed=4), reference)
    large = log_likelihood(model, x, k=50, seed=2**64)  # a seed of any size (from 2**63 was "must be >= 0")
    torch.testing.assert_close(log_likelihood(model, x, k=50, chunk=7, seed=2**64), large, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(log_likelihood(model, x, k=50, seed=2**63), large)


def passes_of(model):
    """The (samples, examples) of each forward pass of model from now on, in a list that fills as they are made."""
    seen = []
    forward = model.forward

    def spy(x, k=None, noise=None):
        seen.append((k, x.shape[0]))
        return forward(x, k=k, noise=noise)

    model.forward = spy
    return seen


def test_every_sample_is_used_when_k_is_not_a_multiple_of_the_chunk():
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,)).eval()
    seen = passes_of(model)
    x = torch.rand(3, 1, 4, 4)
    estimate = importance_sample(model, x, k=23, chunk=5)
    assert seen == [(5, 3), (5, 3), (5, 3), (5, 3), (3, 3)]
    assert (estimate.ess >= 1).all() and (estimate.ess <= 23 + 1e-4).all()


def test_a_pass_holds_at_most_max_elements_parameters_of_p_x_given_z(monkeypatch):
    """The default chunk and batch bound a pass's (sample, example, pixel) outputs by MAX_ELEMENTS, whatever N. A
    batch of every example gives the same estimate, so only this sees it: for 10,000 MNIST images at K_chunk = 200
    that is 6.3 GB of logits a pass."""
    from vaelab import density

    monkeypatch.setattr(density, "MAX_ELEMENTS", 16 * 40)  # 4x4 images: 40 (sample, example) pairs a pass
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,)).eval()
    seen = passes_of(model)
    importance_sample(model, torch.rand(5, 1, 4, 4), k=100)
    assert seen == [(40, 1), (40, 1), (20, 1)] * 5  # 40 samples of one example: the budget
    seen.clear()
    importance_sample(model, torch.rand(9, 1, 4, 4), k=8)
    assert seen == [(8, 5), (8, 4)]  # 8 samples of 5 examples fill it


def test_a_long_estimate_shows_its_progress_over_every_sample(monkeypatch):
    """`vaelab evaluate --nll` (K = 5000 over 10,000 images: minutes to hours on a CPU) said nothing until done."""
    from vaelab import density

    bars = []

    class Bar:
        def __init__(self, *, total, disable, **kwargs):
            self.total, self.disable, self.n = total, disable, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(density, "tqdm", Bar)
    model = VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,)).eval()
    x = torch.rand(7, 1, 4, 4)
    quiet = importance_sample(model, x, k=23, chunk=5, batch_size=3)
    shown = importance_sample(model, x, k=23, chunk=5, batch_size=3, progress=True)
    assert torch.equal(quiet.log_px, shown.log_px)
    assert [(b.total, b.n, b.disable) for b in bars] == [(7 * 23, 7 * 23, True), (7 * 23, 7 * 23, None)]  # (None:
    # on a terminal only)


def test_a_long_estimate_off_a_terminal_says_how_long_it_will_take(monkeypatch, capsys):
    """evaluate --nll --k 1000000000000 ran on with no word when stderr was no terminal (no progress bar)."""
    from vaelab import density

    model = VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,)).eval()
    x = torch.rand(7, 1, 4, 4)
    clock = iter(range(1000))  # each reading 1 s after the last: the estimate after two passes (ESTIMATE_AFTER)
    monkeypatch.setattr(density.time, "perf_counter", lambda: next(clock))
    importance_sample(model, x, k=230, chunk=5, batch_size=3, progress=True)  # 3 x 46 passes
    assert capsys.readouterr().err.strip() == ("log p(x) with K=230 over 7 examples: about 2.3 min at this rate "
                                               "(estimated after 2 s; no progress bar off a terminal); the time "
                                               "grows with K")  # 138 passes at 1 s each
    for progress, shorter in ((True, 50), (False, 1000)):  # a shorter run, or no progress asked for: no word
        clock = iter(range(10000))
        importance_sample(model, x, k=shorter, chunk=5, batch_size=3, progress=progress)
        assert capsys.readouterr().err == ""


def test_importance_sampling_runs_under_no_grad_and_leaves_global_rng_alone():
    model = VAE(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,))
    x = torch.rand(4, 1, 4, 4)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    values = log_likelihood(model, x, k=10)
    assert not values.requires_grad
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training  # the mode is restored


def tiny_data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(3, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    x = (centres[y] * 0.8 + 0.2 * torch.rand(n, 1, 6, 6, generator=g)).clamp(0, 1)
    a, b = int(n * 0.7), int(n * 0.85)
    return Dataset(name="tiny", train=Split(x[:a], y[:a]), val=Split(x[a:b], y[a:b]), test=Split(x[b:], y[b:]))


def tiny_config(**train_args):
    return RunConfig(data=DataConfig(name="tiny", binarize="dynamic"),
                     model=ModelConfig(hidden=(16,), latent_dim=3),
                     train=TrainConfig(**{"epochs": 3, "batch_size": 16, **train_args}))


def test_iwae_objective_trains(tmp_path):
    train(tiny_config(objective="iwae", k=5), tmp_path / "run", dataset=tiny_data(), progress=False)
    records = runs.read_metrics(tmp_path / "run")
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    # the validation loss of an IWAE run is its K-sample bound, never worse than the ELBO on average
    result = evaluate_run(tmp_path / "run", nll_k=5, probe=False, data=tiny_data())
    assert result["objective"] == "iwae"


def test_the_elbo_with_k_samples_trains_on_their_average():
    """`--objective elbo --k 5` is a 5-sample ELBO: nothing checked the forward pass took K samples."""
    from vaelab.steps import objective_for

    torch.manual_seed(0)
    model, x = VAE(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,)), torch.rand(6, 1, 4, 4)
    loss_terms = objective_for(RunConfig(train=TrainConfig(k=5)))
    torch.manual_seed(1)
    got = loss_terms(model, x, beta=1.0)
    torch.manual_seed(1)
    out = model(x, k=5)
    assert out.z.shape == (5, 6, 2) and torch.equal(got["recon"], elbo(out, x)["recon"])
    torch.manual_seed(1)
    assert not torch.equal(got["recon"], elbo(model(x), x)["recon"])


def test_evaluation_suite_writes_every_metric(tmp_path):
    train(tiny_config(), tmp_path / "run", dataset=tiny_data(), progress=False)
    result = evaluate_run(tmp_path / "run", nll_k=40, data=tiny_data())
    saved = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert saved == result
    for key in ("nll", "nll_stderr", "nll_bits_per_dim", "ess_mean", "test_elbo", "test_recon", "test_kl",
                "kl_per_dim", "active_units", "mutual_information", "probe_accuracy_latent",
                "probe_accuracy_pca", "probe_accuracy_pixels", "sse_per_image"):
        assert key in result, key
    assert result["nll_k"] == 40 and result["test_binarize_seed"] == 0
    assert result["nll"] <= -result["test_elbo"] + 1.0  # the K=40 bound is no looser than the ELBO (up to noise)
    assert result["nll_bits_per_dim"] == pytest.approx(result["nll"] / (36 * math.log(2)))
    assert sum(result["kl_per_dim"]) == pytest.approx(result["test_kl"], rel=1e-4)
    assert 0 <= result["active_units"] <= 3 and 1 <= result["ess_mean"] <= 40
    assert -0.1 <= result["mutual_information"] <= math.log(result["n_test"]) + 1e-6  # (estimator noise near 0)
    assert 0 <= result["probe_accuracy_latent"] <= 1
    # a later evaluation without --nll keeps the estimate of the same checkpoint
    torch.manual_seed(12345)  # whatever state the global generator is in
    again = evaluate_run(tmp_path / "run", probe=False, data=tiny_data())
    assert again["nll"] == result["nll"]
    for key in ("test_loss", "test_kl", "kl_per_dim", "mutual_information", "mutual_information_upper"):
        assert again[key] == result[key], key  # evaluation draws its noise from a fixed seed: it repeats exactly


def test_a_bernoulli_model_of_grey_values_has_its_elbo_scored_where_its_nll_is(tmp_path):
    """Trained without --binarize, its NLL is of the test images binarised once; its ELBO and KL were of the grey
    ones, and the table's NLL - ELBO gap read as importance sampling's gain (twice its size on digits)."""
    from vaelab.data import binarize
    from vaelab.prepare import EVAL_SEED

    data = tiny_data()
    config = dataclasses.replace(tiny_config(), data=DataConfig(name="tiny"))
    train(config, tmp_path / "run", dataset=data, progress=False)
    result = evaluate_run(tmp_path / "run", nll_k=40, probe=False, data=data)
    x = binarize(data.test.x, torch.Generator().manual_seed(EVAL_SEED))
    model = runs.load(tmp_path / "run")
    with torch.no_grad():
        kl = float(kl_divergence(model.encode(x), model.prior()).mean())
    assert result["test_binarize_seed"] == EVAL_SEED and result["test_kl"] == pytest.approx(kl, rel=1e-5)
    assert sum(result["kl_per_dim"]) == pytest.approx(kl, rel=1e-5)
    assert result["nll"] <= -result["test_elbo"] + 0.5  # one test set: a bound and its estimate
    ae = dataclasses.replace(config, model=ModelConfig(model="ae", hidden=(16,), latent_dim=3))
    train(ae, tmp_path / "ae", dataset=data, progress=False)
    assert evaluate_run(tmp_path / "ae", probe=False, data=data)["test_binarize_seed"] is None  # grey, as given
    _, markdown = compare_runs([tmp_path / "run", tmp_path / "ae"])  # whose recon columns are of other images
    assert "recon, ELBO and KL are of the test images binarised once (seed 0) in rows of VAEs" in markdown
    assert "binarised once" not in compare_runs([tmp_path / "run"])[1]


def test_a_gaussian_likelihood_s_nll_is_labelled_a_density_without_bits_per_dimension(tmp_path):
    """A Gaussian's log p(x) is a density of pixels in [0, 1]: as bits per dimension it read as a discrete
    model's NLL (and is below 0 wherever the density exceeds 1)."""
    from vaelab.reports import write_report

    config = dataclasses.replace(tiny_config(), data=DataConfig(name="tiny"),
                                 model=ModelConfig(hidden=(16,), latent_dim=3, likelihood="gaussian-learned"))
    train(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    result = evaluate_run(tmp_path / "run", nll_k=5, probe=False, data=tiny_data())
    assert result["nll_density"] is True and "nll_bits_per_dim" not in result and math.isfinite(result["nll"])
    assert evaluate_run(tmp_path / "run", probe=False, data=tiny_data())["nll_density"]  # kept with the NLL
    page = write_report(tmp_path / "run", baselines=False, data=tiny_data()).read_text()
    assert "a density of the values trained on (pixels scaled to [0, 1]); Gaussian likelihood" in page
    assert "bits per dimension" not in page
    train(tiny_config(), tmp_path / "bernoulli", dataset=tiny_data(), progress=False)
    bernoulli = evaluate_run(tmp_path / "bernoulli", nll_k=5, probe=False, data=tiny_data())
    assert "nll_density" not in bernoulli and "nll_bits_per_dim" in bernoulli
    _, markdown = compare_runs([tmp_path / "run", tmp_path / "bernoulli"])
    gaussian_row, bernoulli_row = markdown.splitlines()[2:4]
    assert f"| {result['nll']:.2f} (density) |" in gaussian_row and "(density)" not in bernoulli_row
    assert ("\n(density): -log p(x) of a Gaussian likelihood, a density of the values trained on "
            "(pixels scaled to [0, 1]).\n") in markdown
    assert "binarised once (seed 0) in rows of VAEs" in markdown  # the Bernoulli run's recon is of binary images


def one_pixel_gaussian(w: float, s: float, b: float) -> tuple[VAE, torch.distributions.Normal]:
    """x|z ~ N(w z + b, s^2) on one pixel with its exact posterior as encoder; p(x) = N(b, w^2 + s^2)."""
    model = VAE(input_shape=(1, 1, 1), latent_dim=1, hidden=(), likelihood="gaussian", sigma=s, linear=True)
    m = w * w + s * s
    with torch.no_grad():
        model.decoder.body.body[0].weight.fill_(w)
        model.decoder.body.body[0].bias.fill_(b)
        model.posterior.mean.weight.fill_(w / m)
        model.posterior.mean.bias.fill_(-w / m * b)
        model.posterior.logvar.weight.zero_()
        model.posterior.logvar.bias.fill_(math.log(s * s / m))
    return model.eval(), torch.distributions.Normal(torch.tensor(b, dtype=torch.float64), math.sqrt(m))


@pytest.mark.parametrize("scale,gap", [(0.002, (0.002, 0.01)), (0.05, (-1e-4, 1e-4))])
def test_dequantised_density_plus_d_log_256_bounds_the_8_bit_nll(scale, gap):
    """-log P(k) <= E_u[-log p((k + u)/256)] + log 256 (Theis et al. 2016): against the exact probability of the
    bin, a CDF difference. Loose where the density is as narrow as a bin (Jensen's gap), tight where it is smooth."""
    k = 100
    model, marginal = one_pixel_gaussian(scale, scale, (k + 0.3) / 256)
    v = dequantize(torch.full((4000, 1, 1, 1), k / 255), torch.Generator().manual_seed(0))
    nll = -log_likelihood(model, v, k=1).double()  # exact: the proposal is the posterior
    torch.testing.assert_close(nll, -marginal.log_prob(v.flatten().double()), rtol=0, atol=1e-4)
    bound = float(nll.mean()) + math.log(256)
    exact = -math.log(float(marginal.cdf(torch.tensor((k + 1) / 256)) - marginal.cdf(torch.tensor(k / 256))))
    assert gap[0] < bound - exact < gap[1]


def test_a_dequantised_run_reports_bits_per_dimension_of_its_8_bit_images(tmp_path):
    from vaelab.reports import write_report

    data = eight_bit(tiny_data())
    config = dataclasses.replace(tiny_config(), data=DataConfig(name="tiny", dequantize=True),
                                 model=ModelConfig(hidden=(16,), latent_dim=3, likelihood="gaussian-learned"))
    train(config, tmp_path / "run", dataset=data, progress=False)
    result = evaluate_run(tmp_path / "run", nll_k=5, probe=False, data=data)
    assert result["nll_dequantized"] and result["nll_density"]
    assert result["nll_bits_per_dim"] == pytest.approx((result["nll"] + 36 * math.log(256)) / (36 * math.log(2)))
    page = write_report(tmp_path / "run", baselines=False, data=data).read_text()
    assert "a density of the dequantised pixels" in page and "NLL of the 8-bit images, bits per dimension" in page


def test_pca_log_marginal_is_probabilistic_pca_s_exact_gaussian_and_the_maximum_likelihood_fit_s():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, 4, 5, generator=g)
    x[:, :, 0] = 0.5 * x[:, :, 1] + 0.1 * x[:, :, 0]  # correlated rows: a principal subspace worth the name
    model = PCA(input_shape=(1, 4, 5), latent_dim=3).fit(x)
    u, eigenvalues = model.components.double().T, model.explained_variance.double()
    noise = model.noise_variance.double()
    w = u * (eigenvalues - noise).sqrt()  # Tipping & Bishop 1999, eq. 7 (R = I)
    exact = MultivariateNormal(model.mean.double(), w @ w.T + noise * torch.eye(20, dtype=torch.float64))
    test = torch.rand(7, 1, 4, 5, generator=g)
    assert torch.allclose(model.log_marginal(test), exact.log_prob(test.flatten(1).double()), atol=1e-6)
    # at the maximum-likelihood C the training data's mean log-likelihood is -(P log 2 pi + log |C| + P) / 2, as
    # tr(C^-1 S) = P (Tipping & Bishop, eq. 4); also with fewer examples than pixels (N = 15 < P = 40), where the
    # noise was the mean of the N - L non-zero discarded eigenvalues alone (4x too large here), and at the
    # 1/N-normalised S (the eigenvalues were 1/(N - 1)'s)
    for data in (x, torch.rand(15, 1, 5, 8, generator=g)):
        model = PCA(input_shape=data.shape[1:], latent_dim=3).fit(data)
        p = data[0].numel()
        u, eigenvalues, noise = model.components.double().T, model.explained_variance.double(), model.noise_variance
        w = u * (eigenvalues - noise).sqrt()
        log_det = torch.logdet(w @ w.T + noise * torch.eye(p, dtype=torch.float64))
        expected = -0.5 * (p * math.log(2 * math.pi) + log_det + p)
        assert float(model.log_marginal(data).mean()) == pytest.approx(float(expected), abs=1e-5)


def test_evaluate_gives_pca_its_exact_nll_as_a_density_and_says_so(tmp_path):
    from vaelab.reports import EXACT, write_report

    data = eight_bit(tiny_data())
    for name, dequantised in (("pca", False), ("dequantised", True)):
        config = RunConfig(data=DataConfig(name="tiny", dequantize=dequantised),
                           model=ModelConfig(model="pca", latent_dim=3))
        train(config, tmp_path / name, dataset=data, progress=False)
    result = evaluate_run(tmp_path / "pca", nll_k=5000, probe=False, data=data)
    model = runs.load(tmp_path / "pca")
    assert result["nll"] == pytest.approx(-float(model.log_marginal(data.test.x).mean()))
    assert torch.equal(log_likelihood(model, data.test.x, k=7), model.log_marginal(data.test.x).float())
    with pytest.raises(InputError, match=r"PCA models have no latent posterior .*exact: log_likelihood\(model, x\)"):
        importance_sample(model, data.test.x, k=7)  # were tracebacks from forward(x, k=...), as for an AE
    with pytest.raises(InputError, match=r"AE models have no latent posterior and prior to sample from"):
        log_likelihood(AE(input_shape=(1, 6, 6), latent_dim=2, hidden=(4,)), data.test.x)
    assert result["nll_exact"] and result["nll_density"] and "nll_k" not in result and "ess_mean" not in result
    assert "nll_bits_per_dim" not in result and result["test_binarize_seed"] is None  # grey pixels, not binarised
    assert "test_kl" not in result and "test_recon" in result  # no KL term: its 0 read as a collapsed posterior
    assert result["objective"] is None  # was "elbo", the unused default: PCA is fitted in closed form
    page = html.unescape(write_report(tmp_path / "pca", baselines=False, data=data).read_text())
    assert "a density of the values trained on (pixels scaled to [0, 1]); Gaussian" in page and EXACT in page
    dequantised = evaluate_run(tmp_path / "dequantised", nll_k=5000, probe=False, data=data)
    assert dequantised["nll_dequantized"]
    page = html.unescape(write_report(tmp_path / "dequantised", baselines=False, data=data).read_text())
    assert f"a density of the dequantised pixels (k + u)/256{EXACT}" in page  # the exact label was lost there
    assert dequantised["nll_bits_per_dim"] == pytest.approx((dequantised["nll"] + 36 * math.log(256)) /
                                                             (36 * math.log(2)))
    _, markdown = compare_runs([tmp_path / "pca"])
    assert f"| {result['nll']:.2f} (density) | exact |" in markdown.splitlines()[2]


def test_compare_prints_a_markdown_row_per_run(tmp_path):
    for name, beta in (("a", 1.0), ("b", 4.0)):
        train(tiny_config(beta=beta), tmp_path / name, dataset=tiny_data(), progress=False)
        evaluate_run(tmp_path / name, nll_k=10, probe=False, data=tiny_data())
    rows, markdown = compare_runs([tmp_path / "a", tmp_path / "b"])
    assert len(rows) == 2 and markdown.count("\n") == 4
    assert "NLL (nats)" in markdown and str(tmp_path / "b") in markdown
    assert rows[1]["test_kl"] < rows[0]["test_kl"]  # a larger beta buys a smaller KL
    (tmp_path / "b").rename(tmp_path / "renamed")  # a row showed the path its evaluation.json was written by
    rows, markdown = compare_runs([tmp_path / "renamed"])
    assert rows[0]["run"] == str(tmp_path / "renamed") and f"| {tmp_path / 'b'} |" not in markdown
    (tmp_path / "renamed").rename(tmp_path / "a|b <i>c&lt;")  # a cell more than the header, and HTML
    head, _, row = compare_runs([tmp_path / "a|b <i>c&lt;"])[1].splitlines()[:3]
    assert row.startswith(f"| {tmp_path}/a\\|b &lt;i>c&amp;lt; | ")
    assert head.count("|") == row.count("|") - row.count("\\|")


def test_compare_evaluates_again_a_run_trained_on_after_its_evaluation(tmp_path, capsys):
    """compare read evaluation.json as it was: a run evaluated at epoch 1 and trained to epoch 2 showed epoch 1's
    numbers as the run's."""
    config = RunConfig(data=DataConfig(name="digits"), model=ModelConfig(hidden=(8,), latent_dim=2),
                       train=TrainConfig(epochs=1))
    train(config, tmp_path / "run", progress=False)
    evaluate_run(tmp_path / "run", nll_k=5, probe=False)
    train(dataclasses.replace(config, train=TrainConfig(epochs=2)), tmp_path / "run", resume=True, progress=False)
    before = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    rows, markdown = compare_runs([tmp_path / "run"])
    assert rows[0]["epoch"] == 2 and "| 2 |" in markdown and "nll" not in rows[0]
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run'}: evaluation.json is of epoch 1, the run is at epoch 2: evaluating it again" in err
    assert (f"vaelab: note: {tmp_path / 'run' / 'evaluation.json'} held an NLL estimate (evaluation.json is of "
            f"epoch 1, the run is at epoch 2); it is kept in evaluation.previous.json (vaelab evaluate "
            f"{tmp_path / 'run'} --nll estimates it anew)") in err
    assert json.loads((tmp_path / "run" / "evaluation.previous.json").read_text()) == before  # (hours of work)
    compare_runs([tmp_path / "run"])  # now current: read, not evaluated again
    assert capsys.readouterr().err == ""


def test_an_older_vaelab_s_evaluation_is_evaluated_again_not_shown(tmp_path, capsys):
    """An evaluation.json of the same epoch was trusted whatever vaelab wrote it, though the definitions of its
    numbers had changed since (an HVAE's latent statistics, the autoencoders' KL, the binarised test ELBO)."""
    config = RunConfig(data=DataConfig(name="digits"), model=ModelConfig(hidden=(8,), latent_dim=2),
                       train=TrainConfig(epochs=1))
    train(config, tmp_path / "run", progress=False)
    evaluation = tmp_path / "run" / "evaluation.json"
    old = {"run": str(tmp_path / "run"), "epoch": 1, "test_elbo": 123.0, "nll": 45.0, "nll_k": 5}  # no format
    evaluation.write_text(json.dumps(old))
    rows, _ = compare_runs([tmp_path / "run"])
    assert rows[0]["test_elbo"] != 123.0 and rows[0]["format"] == EVALUATION_FORMAT and "nll" not in rows[0]
    assert (f"{tmp_path / 'run'}: evaluation.json was written by an older vaelab (format 1; this one writes "
            f"{EVALUATION_FORMAT}), which defines its test metrics otherwise: evaluating it again"
            ) in capsys.readouterr().err
    assert json.loads(evaluation.read_text())["format"] == EVALUATION_FORMAT
    assert json.loads((tmp_path / "run" / "evaluation.previous.json").read_text()) == old  # not dropped
    evaluation.write_text(json.dumps(old))
    assert "nll" not in evaluate_run(tmp_path / "run", probe=False)  # not carried into today's numbers
    evaluation.write_text(json.dumps({**old, "format": EVALUATION_FORMAT + 1}))
    compare_runs([tmp_path / "run"])
    assert f"was written by another vaelab (format {EVALUATION_FORMAT + 1};" in capsys.readouterr().err


def test_active_units_and_mutual_information_on_known_encoders():
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=4, hidden=()).eval()
    x = torch.rand(400, 1, 4, 4)
    with torch.no_grad():
        model.posterior.mean.weight[2:].zero_()  # dimensions 2 and 3 ignore x
        model.posterior.mean.weight[:2] *= 10
        model.posterior.logvar.bias.fill_(-12.0)  # near-deterministic
    assert active_units(model, x)["active_units"] == 2
    assert mutual_information(model, x, max_examples=400) == pytest.approx(math.log(400), abs=0.05)
    with torch.no_grad():
        model.posterior.mean.weight.zero_()  # the posterior ignores x entirely
        model.posterior.logvar.bias.zero_()
    assert active_units(model, x)["active_units"] == 0
    assert abs(mutual_information(model, x, max_examples=400)) < 0.05
    bounds = mutual_information_bounds(model.train(), x, max_examples=400)
    assert abs(bounds["mutual_information_upper"]) < 0.05 and bounds["mutual_information_examples"] == 400
    assert model.training  # the mode is restored (it encodes in eval mode)


def test_the_upper_bound_on_the_mutual_information_is_one_in_expectation_near_collapse():
    """The smaller of the leave-one-out bound and the mean KL from one draw was reported: the minimum of a noisy
    bound and an exact one is biased low (here 42% below I, 5 standard errors); an independent draw now chooses."""
    model, exact = linear_gaussian_encoder(w=torch.tensor([[0.06, 0.0, 0.0, 0.0], [0.0, 0.04, 0.04, 0.0]]), s=1.0)
    g = torch.Generator().manual_seed(0)
    upper = np.array([mutual_information_bounds(model, torch.randn(200, 1, 1, 4, generator=g),
                                                seed=seed)["mutual_information_upper"] for seed in range(60)])
    se = upper.std(ddof=1) / math.sqrt(len(upper))
    assert upper.mean() > exact - 2 * se, (upper.mean(), exact, se)


def linear_gaussian_encoder(w: torch.Tensor | None = None, s: float = 0.5) -> tuple[VAE, float]:
    """q(z|x) = N(Wx, s^2 I) for x ~ N(0, I): z ~ N(0, W W^T + s^2 I), so I(x; z) = log det(I + W W^T / s^2) / 2."""
    model = VAE(input_shape=(1, 1, 4), latent_dim=2, hidden=(), likelihood="gaussian").eval()  # x ~ N(0, I)
    if w is None:
        w = torch.tensor([[1.5, 0.0, 0.0, 0.0], [0.0, 0.7, 0.7, 0.0]])
    with torch.no_grad():
        model.posterior.mean.weight.copy_(w)
        model.posterior.mean.bias.zero_()
        model.posterior.logvar.weight.zero_()
        model.posterior.logvar.bias.fill_(2 * math.log(s))
    return model, 0.5 * float(torch.logdet(torch.eye(2) + w @ w.T / s**2))


def test_mutual_information_bounds_bracket_the_exact_value_in_expectation_and_close_in_on_it_with_more_examples():
    model, exact = linear_gaussian_encoder()  # 1.95 nats
    g = torch.Generator().manual_seed(0)
    few = [mutual_information_bounds(model, torch.randn(50, 1, 1, 4, generator=g), seed=seed) for seed in range(40)]
    # in expectation: InfoNCE below, leave-one-out above; at N = 50 the bias (~0.2) dwarfs the mean's noise
    assert np.mean([b["mutual_information"] for b in few]) < exact - 0.05
    assert np.mean([b["mutual_information_upper"] for b in few]) > exact + 0.05
    many = mutual_information_bounds(model, torch.randn(2000, 1, 1, 4, generator=g))
    assert abs(many["mutual_information"] - exact) < 0.05 and abs(many["mutual_information_upper"] - exact) < 0.05
    one = torch.randn(1, 1, 1, 4, generator=g)  # no other code to leave out: the mean KL is the upper bound
    with torch.no_grad():
        kl = float(kl_divergence(model.encode(one), model.prior()))
    assert mutual_information_bounds(model, one)["mutual_information_upper"] == pytest.approx(kl)
    model.prior = lambda: (_ for _ in ()).throw(NotImplementedError)  # as for a latent without an analytic KL
    assert mutual_information_bounds(model, one)["mutual_information_upper"] is None


def test_reconstruction_error_is_per_image_and_per_value_of_colour_images():
    """Per pixel meant per value, channels included: dividing by H x W alone tripled an RGB set's figure."""
    from torch import nn

    from vaelab.evaluate import reconstruction_error

    class Grey(nn.Module):  # reconstructs every value as 0.5
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def reconstruct(self, x):
            return torch.full_like(x, 0.5)
    x = torch.ones(5, 3, 4, 2)
    assert reconstruction_error(Grey(), x, batch_size=2) == {"sse_per_image": 24 * 0.25, "mse_per_pixel": 0.25}


def test_the_mutual_information_bounds_are_the_estimators_they_name():
    """InfoNCE (+ log N) and the leave-one-out bound (+ log(N - 1)), by hand on six codes: + log N in the second
    passed the bracketing test above, whose tolerances absorb log(N / (N - 1)) at N = 50."""
    model, _ = linear_gaussian_encoder()
    with torch.no_grad():  # posteriors of scale 3, wider than the prior: the leave-one-out bound is below the KL
        model.posterior.logvar.bias.fill_(2 * math.log(3.0))
    x = torch.randn(6, 1, 1, 4, generator=torch.Generator().manual_seed(1))
    bounds = mutual_information_bounds(model, x, seed=3)
    xs = x[torch.randperm(6, generator=torch.Generator().manual_seed(3))]  # the estimator's order and draws
    torch.manual_seed(3)
    with torch.no_grad():
        qz = model.encode(xs)
        z = qz.sample()
        pairs = torch.distributions.Normal(qz.mean[None], qz.stddev[None]).log_prob(z[:, None]).sum(-1).double()
        kl = float(kl_divergence(qz, model.prior()).mean())
    own = pairs.diagonal()
    lower = float((own - pairs.logsumexp(1) + math.log(6)).mean())
    others = pairs.masked_fill(torch.eye(6, dtype=torch.bool), -math.inf)
    leave_one_out = float((own - others.logsumexp(1) + math.log(5)).mean())
    assert leave_one_out < kl  # so that the reported upper bound is this one
    assert bounds["mutual_information"] == pytest.approx(lower, abs=1e-5)
    assert bounds["mutual_information_upper"] == pytest.approx(leave_one_out, abs=1e-5)


def test_the_mean_kl_bounds_the_mutual_information_where_posteriors_barely_overlap():
    """Near-deterministic codes: the lower bound sits at its ceiling log N, the leave-one-out bound runs to
    thousands of nats, and E_x KL(q(z|x) || p(z)) = I + KL(q(z) || p(z)) is the upper bound reported."""
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=2, hidden=()).eval()
    with torch.no_grad():
        model.posterior.mean.weight *= 10
        model.posterior.logvar.bias.fill_(-12.0)
    x = torch.rand(300, 1, 4, 4)
    bounds = mutual_information_bounds(model, x)
    with torch.no_grad():
        kl = float(kl_divergence(model.encode(x), model.prior()).mean())
    assert bounds["mutual_information"] == pytest.approx(math.log(300), abs=0.05)
    assert bounds["mutual_information_upper"] == pytest.approx(kl, rel=1e-5) and kl < 25


def test_mutual_information_bounds_its_pairwise_temporaries_whatever_the_latent_size(monkeypatch):
    """All (code, posterior) pairs are scored in chunks of at most PAIR_ELEMENTS (code, posterior, unit)
    triples; a fixed 256 codes a chunk asked for 37 GB at a latent size of 100,000. Chunking changes no value."""
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=3000, hidden=()).eval()
    x = torch.rand(300, 1, 4, 4)
    sizes = []
    log_prob = DiagonalNormal.log_prob

    def recording(self, value):
        sizes.append(torch.broadcast_shapes(value.shape, self.batch_shape + self.event_shape).numel())
        return log_prob(self, value)

    fast = mutual_information_bounds(model, x)
    monkeypatch.delattr(DiagonalNormal, "pairwise_log_prob")  # the path of other latents (vMF, ...)
    monkeypatch.setattr(DiagonalNormal, "log_prob", recording)
    whole = mutual_information_bounds(model, x)
    assert max(sizes) <= latent_stats.PAIR_ELEMENTS < 256 * 300 * 3000
    assert sum(sizes) == 2 * (300 * 3000 + 300 * 300 * 3000)  # two draws: log q(z_i | x_i), then all pairs
    monkeypatch.setattr(latent_stats, "PAIR_ELEMENTS", 1)  # one code a chunk
    assert mutual_information(model, x) == pytest.approx(whole["mutual_information"], rel=1e-5)
    assert fast == pytest.approx(whole, rel=1e-5)  # the diagonal Gaussian's matrix products: the same bounds


def test_pairwise_log_prob_of_a_diagonal_gaussian_matches_log_prob_of_every_pair():
    g = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(7, 5, generator=g), torch.rand(7, 5, generator=g) * 2 + 0.01
    q, z = DiagonalNormal(loc, scale), torch.randn(4, 5, generator=g) * 3
    assert torch.allclose(q.pairwise_log_prob(z), q.log_prob(z[:, None]).double(), rtol=1e-5, atol=1e-4)
    assert q.pairwise_log_prob(z).shape == (4, 7) and q.pairwise_log_prob(z).dtype == torch.float64


def test_probes_of_codes_wider_than_the_training_set_fit_in_its_span_with_the_same_predictions():
    """A logistic probe on 100,000-dimensional codes took ~8 minutes of a report; its optimum lies in the span of
    the training codes, so it is fitted there (n coordinates), with the same predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    train, test, labels = rng.standard_normal((60, 400)), rng.standard_normal((30, 400)), rng.integers(0, 3, 60)
    in_span, test_in_span = latent_stats._training_span(train, test)
    assert in_span.shape == (60, 60) and np.allclose(in_span @ in_span.T, train @ train.T)  # a rotation
    exact = dict(max_iter=5000, tol=1e-10)
    direct = LogisticRegression(**exact).fit(train, labels).predict_proba(test)
    assert np.allclose(LogisticRegression(**exact).fit(in_span, labels).predict_proba(test_in_span), direct,
                       atol=1e-8)
    torch.manual_seed(0)  # through linear_probes: a VAE whose 300-d codes outnumber 84 training images
    model, data = VAE(input_shape=(1, 6, 6), latent_dim=300, hidden=(8,)).eval(), tiny_data()
    result = latent_stats.linear_probes(data.train.x, data.train.y, data.test.x, data.test.y, model)
    plain = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    codes = [latent_stats.codes(model, x).double().numpy() for x in (data.train.x, data.test.x)]
    assert result["probe_accuracy_latent"] == plain.fit(codes[0], data.train.y).score(codes[1], data.test.y)


def test_active_units_threshold_follows_the_prior_scale_on_the_sphere():
    """Uniform on S^(D-1): each coordinate has variance 1/D, so the 0.01 threshold scales to 0.01/D."""
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=32, hidden=(), latent="vmf", kappa=30.0).eval()
    x = torch.rand(500, 1, 4, 4)
    with torch.no_grad():
        model.posterior.mu.weight.mul_(50)  # mean directions spread over the sphere
    result = active_units(model, x)
    variance = torch.tensor(result["posterior_mean_variance"])
    assert variance.max() < 0.01 < variance.max() * 32  # unscaled, none would count
    assert result["active_units"] == 32


def test_mean_and_stderr_of_per_example_values():
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0, 6.0])  # sample std (n - 1): sqrt(14 / 3)
    assert mean == pytest.approx(3.0) and stderr == pytest.approx(math.sqrt(14 / 3) / 2)
    assert mean_and_stderr(torch.tensor([[1.0], [3.0]])) == pytest.approx((2.0, 1.0))  # any shape, flattened
    assert math.isnan(mean_and_stderr([5.0])[1])  # one value has no spread to estimate
    one = nll_summary(torch.tensor([-5.0]), 4)  # a test split of one image: its NaN reached evaluation.json
    assert one == {"nll": 5.0, "nll_bits_per_dim": 5 / (4 * math.log(2))}


def test_mutual_information_of_near_deterministic_codes_is_exactly_at_its_ceiling():
    """sigma = 1e-6: every code is far from the other posteriors, so the lower bound is log N to rounding. The
    pairwise matrix products expand the quadratic, losing ~0.1 nats of each code's own term at this scale."""
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=32, hidden=()).eval()
    with torch.no_grad():
        model.posterior.mean.weight.mul_(20)
        model.posterior.logvar.weight.zero_()
        model.posterior.logvar.bias.fill_(2 * math.log(1e-6))
    bounds = mutual_information_bounds(model, torch.rand(200, 1, 4, 4))
    assert bounds["mutual_information"] == pytest.approx(math.log(200), abs=1e-6)


def test_keyed_noise_holds_one_pass_of_blocks_and_depends_on_neither_k_nor_the_chunk():
    """All K samples of noise were drawn at once: K x batch x latent floats, 4.4 GB for a hierarchy's 2,080
    latents at K = 5000, where `--chunk` promised bounded memory."""
    from vaelab.density import NOISE_BLOCK, KeyedNoise

    def draw(k: int, chunk: int) -> torch.Tensor:
        keyed = KeyedNoise(seed=3, first=5, batch=2, k=k, device=torch.device("cpu"))
        parts = []
        for offset in range(0, k, chunk):
            view = keyed.samples(offset)
            parts.append(view.normal((min(chunk, k - offset), 2, 4)))  # draw 0, as a latent group's
            assert view.normal((min(chunk, k - offset), 2, 3)).shape[0] == min(chunk, k - offset)  # draw 1
            held = sum(block.shape[0] for block in keyed._blocks.values())
            assert held <= 2 * (chunk + 2 * min(k, NOISE_BLOCK))  # a pass's blocks, whatever K (and K if smaller:
        return torch.cat(parts)  # 200 rows for K = 1 took 3.5x the memory and time)

    long = draw(10 * NOISE_BLOCK + 7, 200)
    assert long.shape == (10 * NOISE_BLOCK + 7, 2, 4) and torch.equal(draw(10 * NOISE_BLOCK + 7, 7), long)
    assert torch.equal(draw(2 * NOISE_BLOCK, 150), long[:2 * NOISE_BLOCK])  # the first samples of any K >= 200
    assert draw(3, 1).shape == (3, 2, 4)
    assert 0.95 < float(long.std()) < 1.05 and not torch.equal(long[:, 0], long[:, 1])
