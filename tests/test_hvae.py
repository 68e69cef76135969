"""The hierarchical VAE (NVAE-style): shapes, KL per group, reductions to the VAE and the ELBO, sampling,
spectral norms, KL balancing, and the model end to end through the CLI."""
import dataclasses
import json
import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from vaelab import runs
from vaelab.cli import main
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig, check_trainable
from vaelab.density import importance_sample
from vaelab.errors import ConfigError
from vaelab.evaluate import compare_runs
from vaelab.hvae_cells import ResidualCell, SpectralNorms
from vaelab.models import HVAE, build_model
from vaelab.models.hvae import SOFTPLUS_ONE, kl_balance_coefficients, soft_scale
from vaelab.objectives import elbo, iwae
from vaelab.train import train


def small(**kwargs) -> HVAE:
    torch.manual_seed(0)
    args = dict(input_shape=(1, 12, 12), latent_dim=3, hidden=(8, 12), groups=(1, 2))
    return HVAE(**{**args, **kwargs}).eval()


def binary(n: int = 5, shape=(1, 12, 12)) -> torch.Tensor:
    return (torch.rand(n, *shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()


def test_shapes_across_groups_and_scales():
    model = small()  # scales 6x6 and 3x3; top scale (3x3) has 1 group, the 6x6 scale 2
    assert model.group_shapes == [(3, 3, 3), (3, 6, 6), (3, 6, 6)]
    assert model.group_sizes == [27, 108, 108] and model.latent_dim == 27
    x = binary()
    out = model(x)
    assert [g.z.shape for g in out.groups] == [(5, 3, 3, 3), (5, 3, 6, 6), (5, 3, 6, 6)]
    assert out.log_px_z(x).shape == (5,) and out.log_pz().shape == (5,) and out.kl_units().shape == (5, 3)
    out_k = model(x, k=4)
    assert [g.z.shape for g in out_k.groups] == [(4, 5, 3, 3, 3), (4, 5, 3, 6, 6), (4, 5, 3, 6, 6)]
    assert out_k.log_px_z(x).shape == (4, 5) and out_k.log_qz().shape == (4, 5) and out_k.kl().shape == (4, 5)
    assert model.sample(7).shape == (7, 1, 12, 12) and model.reconstruct(x).shape == x.shape
    assert model.encode(x).batch_shape == (5,) and model.encode(x).event_shape == (27,)
    assert model.decode(torch.zeros(2, 6, 27)).mean.shape == (2, 6, 1, 12, 12)  # interpolations in the top group
    assert [m.shape for m in model.group_means(x)] == [(5, 27), (5, 108), (5, 108)]
    odd = small(input_shape=(3, 7, 9))  # odd sizes are cropped back after the sub-pixel head
    assert odd.sample(2).shape == (2, 3, 7, 9)


def test_scales_without_groups_only_process_features_as_nvae_does():
    # NVAE keeps its latent groups at coarse scales, with cells without latents at the finer ones
    model = small(hidden=(4, 8, 12), groups=(1, 2, 0))  # scales 6x6 (no groups), 3x3 (2 groups), 2x2 (1)
    assert model.group_shapes == [(3, 2, 2), (3, 3, 3), (3, 3, 3)]
    assert [len(blocks) for blocks in model.enc] == [1, 2, 1] and len(model.post) == 1
    x = binary()
    assert [f.shape for f in model.bottom_up(x)] == [(5, 12, 2, 2), (5, 8, 3, 3), (5, 8, 3, 3)]
    out = model(x, k=4)
    assert out.log_px_z(x).shape == (4, 5) and out.kl_units().shape == (4, 5, 3)
    assert model.sample(2).shape == (2, 1, 12, 12) and model.reconstruct(x).shape == x.shape
    before = model.reconstruct(x)
    with torch.no_grad():  # the post-processing cells sit between the last group and the likelihood
        model.post[0][0].branch[2].weight.add_(1.0)
    assert not torch.allclose(model.reconstruct(x), before)
    for groups in [(0, 2, 2), (1, 0, 2)]:  # a scale without latents above one with them
        with pytest.raises(ConfigError, match="finest scales"):
            small(hidden=(4, 8, 12), groups=groups)
        with pytest.raises(ConfigError, match="only the finest scales"):
            ModelConfig(model="hvae", hidden=(4, 8, 12), groups=groups)


def test_kl_per_group_matches_a_monte_carlo_estimate():
    model = small()
    x = binary(2)
    out = model(x, k=4_000)
    # at fixed samples of the groups above, log q(z_l) - log p(z_l) at z_l ~ q averages to KL_l
    for g, analytic in zip(out.groups, out.kl_units().unbind(-1), strict=True):
        mc = g.qz.log_prob(g.z) - g.pz.log_prob(g.z)  # (K, B)
        torch.testing.assert_close(mc.mean(0), analytic.mean(0), atol=0.1, rtol=0.01)  # errors seen over seeds: < 0.04
    total = out.log_qz() - out.log_pz()
    torch.testing.assert_close(total.mean(0), out.kl().mean(0), atol=0.15, rtol=0.01)


def test_posterior_is_relative_to_the_prior():
    model = small()
    mu_p, scale_p = torch.randn(2, 3, 6, 6), torch.rand(2, 3, 6, 6) + 0.5
    q = model._posterior(mu_p, scale_p, torch.zeros(2, 6, 6, 6))  # a head output of 0: no change
    torch.testing.assert_close(q.base_dist.loc, mu_p)
    torch.testing.assert_close(q.base_dist.scale, scale_p + model.scale_floor)
    # NVAE eq. 2: mu_q = mu_p + dmu, sigma_q = sigma_p * dsigma (+ the floor), here with dsigma = 2
    delta_mu = torch.randn(2, 3, 6, 6)
    raw = torch.full((2, 3, 6, 6), math.log(math.expm1(2.0)) - SOFTPLUS_ONE)
    q = model._posterior(mu_p, scale_p, torch.cat([delta_mu, raw], 1))
    torch.testing.assert_close(q.base_dist.loc, mu_p + delta_mu)
    torch.testing.assert_close(q.base_dist.scale, 2 * scale_p + model.scale_floor)


def test_a_lower_prior_head_output_of_zero_gives_a_unit_scale():
    """soft_scale shifts softplus so that a prior head's 0 (plus the floor) is a scale of 1, whatever the floor."""
    for floor in (0.0, 0.01, 0.5):
        raw = torch.tensor([-30.0, 0.0, 30.0])
        scale = soft_scale(raw, floor) + floor
        torch.testing.assert_close(scale[1], torch.tensor(1.0))
        assert floor <= scale[0] < scale[1] < scale[2] and scale[2] == pytest.approx(30.0, rel=0.05)


def test_one_group_is_a_conv_vae_with_a_standard_normal_prior():
    model = small(hidden=(8,), groups=(1,))
    x = binary()
    torch.manual_seed(3)
    out = model(x)
    (group,) = out.groups
    assert torch.equal(group.pz.base_dist.loc, torch.zeros_like(group.z))
    torch.testing.assert_close(group.pz.base_dist.scale, torch.ones_like(group.z))
    q = group.qz.base_dist
    # the ordinary VAE's ELBO: E_q[log p(x|z)] - KL(q(z|x) || N(0, I)), KL in closed form (Kingma & Welling, App. B)
    kl = 0.5 * (q.scale**2 + q.loc**2 - 1 - 2 * q.scale.log()).flatten(1).sum(-1)
    terms = elbo(out, x)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["loss"], -out.px_z.log_prob(x) + kl)
    standard = Independent(Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale)), 3)
    torch.testing.assert_close(out.kl(), kl_divergence(group.qz, standard))


def test_iwae_with_one_sample_equals_the_elbo_of_the_hierarchy():
    model = small()
    x = binary()
    torch.manual_seed(4)
    out = model(x, k=1)
    torch.testing.assert_close(iwae(out, x)["loss"], elbo(out, x, kl="mc")["loss"])
    # and the importance-sampled log p(x) over the whole hierarchy: at least the ELBO on average, chunk-invariant
    a = importance_sample(model, x, k=32, chunk=32, seed=0)
    b = importance_sample(model, x, k=32, chunk=7, batch_size=2, seed=0)
    torch.testing.assert_close(a.log_px, b.log_px, atol=1e-4, rtol=0)
    torch.manual_seed(5)
    with torch.no_grad():
        mean_elbo = -torch.stack([elbo(model(x), x)["loss"] for _ in range(20)]).mean(0)
    assert float(a.log_px.mean()) > float(mean_elbo.mean())


def test_temperature_zero_sampling_is_deterministic_and_lower_temperature_narrows():
    model = small()
    torch.manual_seed(0)
    a = model.sample(4, temperature=0.0)
    torch.manual_seed(1)
    b = model.sample(4, temperature=0.0)
    # the same draw bit for bit under any seed; rows of one batch agree up to rounding (oneDNN's kernels may
    # block a batch differently with one thread than with two)
    assert torch.equal(a, b) and torch.allclose(a[0], a[3], rtol=0, atol=1e-6)
    torch.manual_seed(2)
    hot = model.sample(64, temperature=1.0).std(0).mean()
    torch.manual_seed(2)
    cool = model.sample(64, temperature=0.3).std(0).mean()
    assert cool < hot
    # every group's draw is its prior mean plus t sigma_p eps: the same eps (the same seed) at t = 0.5 lands half
    # as many prior scales away as at t = 1 (group 1's prior has sigma 1, so only the lower groups tell t sigma
    # from t / sigma)
    def prior_scores(t):
        torch.manual_seed(3)
        groups, _ = model._top_down(8, temperature=t)
        return [(g.z - g.pz.mean) / g.pz.stddev for g in groups]

    for half, whole in zip(prior_scores(0.5), prior_scores(1.0), strict=True):
        torch.testing.assert_close(half, 0.5 * whole)


def test_spectral_norm_estimate_matches_the_largest_singular_value():
    torch.manual_seed(0)
    weights = [torch.randn(16, 8, 3, 3), torch.randn(5, 7)]
    norms = SpectralNorms([w.shape for w in weights])
    estimate = norms(weights, iterations=100)
    exact = torch.stack([torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2) for w in weights])
    torch.testing.assert_close(estimate, exact, rtol=1e-4, atol=0)
    # the buffers keep u, so a single further iteration stays at the answer; the estimate carries gradients
    w = weights[0].clone().requires_grad_()
    norms([w, weights[1]], iterations=1)[0].backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    # NVAE's L_SR sums sigma_max over every conv and linear weight of the model
    model = small()
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    exact = sum(float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)) for m in layers)
    assert model.spectral_penalty(iterations=300).item() == pytest.approx(exact, rel=1e-3)


def test_spectral_regulariser_in_training_shrinks_the_largest_singular_values(tmp_path):
    """--spectral-reg adds lambda * sum_i sigma_max(W_i) to each step's loss (NVAE Sec. 3.3.2): the same run with it
    ends with smaller singular values. The logged losses leave the penalty out, so only the weights show it."""
    from test_train import tiny_data

    data = tiny_data(n=64, shape=(1, 8, 8))

    def penalty_after_training(reg):
        config = RunConfig(data=DataConfig(name="tiny", binarize="dynamic"),
                           model=ModelConfig(model="hvae", hidden=(4, 8), groups=(1, 1), latent_dim=2),
                           train=TrainConfig(epochs=2, batch_size=16, lr=0.01, warmup_epochs=0, spectral_reg=reg))
        model = train(config, tmp_path / f"reg{reg}", dataset=data, progress=False)
        with torch.no_grad():
            return float(model.spectral_penalty(iterations=100))

    assert penalty_after_training(0.1) < penalty_after_training(0.0) - 1  # (29.5 without, 25.9 with it)


def test_free_bits_of_a_hierarchy_floor_each_group_s_kl_averaged_over_its_samples():
    """Free bits of an HVAE are per latent group; with K samples per example (a lower group's KL depends on the z
    above it) each group's KL is averaged over them before the floor: sum_l max(lambda, mean_b,k KL_bkl)."""
    model, x = small(), binary()
    torch.manual_seed(0)
    out = model(x, k=3)
    units = out.kl_units()
    assert units.shape == (3, x.shape[0], len(model.group_sizes))
    per_group = units.mean((0, 1))  # (L,)
    lam = float(per_group.detach().median())  # a group above the floor and one below
    terms = elbo(out, x, free_bits=lam)
    torch.testing.assert_close(terms["loss"].mean(), terms["recon"].mean() + per_group.clamp(min=lam).sum())


def test_kl_balancing_coefficients_and_when_they_apply():
    kl = torch.tensor([[1.0, 4.0, 0.0], [3.0, 4.0, 0.0]])  # per-group KLs of two examples
    gamma = kl_balance_coefficients(kl, [2, 4, 8])
    raw = (torch.tensor([2.0, 4.0, 0.0]) + 0.01) / torch.tensor([2.0, 4.0, 8.0])  # (mean |KL_l| + 0.01) / s_l
    torch.testing.assert_close(gamma, raw / raw.mean())
    model = small()
    x = binary()
    torch.manual_seed(0)
    out = model(x)
    plain, balanced = elbo(out, x, beta=0.5), elbo(out, x, beta=0.5, kl_balance=True)
    assert not torch.allclose(plain["loss"], balanced["loss"])
    torch.testing.assert_close(plain["kl"], balanced["kl"])  # the KL reported stays the true one
    torch.testing.assert_close(elbo(out, x, beta=1.0)["loss"], elbo(out, x, beta=1.0, kl_balance=True)["loss"])
    # the loss charges sum_l gamma_l KL_l per example, with K samples each the per-group KLs averaged over them
    for k in (None, 3):
        out = model(x, k=k)
        units = out.kl_units() if k is None else out.kl_units().mean(0)  # (B, L)
        charged = (units * kl_balance_coefficients(units, model.group_sizes)).sum(-1)
        terms = elbo(out, x, beta=0.5, kl_balance=True)
        torch.testing.assert_close(terms["loss"], terms["recon"] + 0.5 * charged)


def test_residual_cell_resamples_and_starts_near_the_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7)
    assert ResidualCell(4, 6, resample="down")(x).shape == (2, 6, 4, 4)
    assert ResidualCell(4, 4, resample="up", out_size=(14, 14))(x).shape == (2, 4, 14, 14)
    cell = ResidualCell(4, 4).eval()
    assert (cell(x) - x).abs().mean() < 0.3 * x.abs().mean()


def test_config_checks_name_the_flag():
    with pytest.raises(ConfigError, match="--groups needs one count per scale"):
        ModelConfig(model="hvae", hidden=(8, 16), groups=(1,))
    with pytest.raises(ConfigError, match="--groups sets the latent groups of --model hvae"):
        ModelConfig(model="vae", groups=(2,))
    with pytest.raises(ConfigError, match="convolutional"):
        ModelConfig(model="hvae", net="mlp")
    for floor in (0.0, 1.0, 1.5):  # the ends of (0, 1) too, and by the model itself, built in Python
        with pytest.raises(ConfigError, match="--scale-floor must be in"):
            ModelConfig(model="hvae", scale_floor=floor)
        with pytest.raises(ConfigError, match="0 < scale_floor < 1"):
            HVAE(input_shape=(1, 12, 12), scale_floor=floor)
    with pytest.raises(ConfigError, match="use them with --model hvae"):
        RunConfig(train=TrainConfig(spectral_reg=0.1))
    config = ModelConfig(model="hvae", input_shape=(1, 12, 12), hidden=(8, 12), latent_dim=2)
    assert config.net == "conv" and config.groups == (2, 2)
    assert isinstance(build_model(config), HVAE)
    # batch norm over a 1x1 coarsest scale has one value per channel in a batch of one: a ValueError in the first
    # step, after the run folder was made
    deep = ModelConfig(model="hvae", input_shape=(1, 8, 8), hidden=(8, 16, 32), groups=(1, 1, 1), latent_dim=2)
    with pytest.raises(ConfigError, match="--batch-size 1: the hierarchy's coarsest scale is 1x1"):
        check_trainable(RunConfig(model=deep, train=TrainConfig(batch_size=1)))
    check_trainable(RunConfig(model=dataclasses.replace(deep, hidden=(8, 16), groups=(1, 1)),
                              train=TrainConfig(batch_size=1)))  # 2x2
    check_trainable(RunConfig(model=deep, train=TrainConfig(batch_size=2)))
    check_trainable(RunConfig(model=deep, train=TrainConfig(batch_size=1)), processes=2)  # synced: 2 per statistic
    with pytest.raises(ConfigError, match="--batch-size 1"):
        check_trainable(RunConfig(model=deep, train=TrainConfig(batch_size=1, sync_bn=False)), processes=2)


def test_group_counts_on_the_command_line_give_one_line_errors(tmp_path, capsys):
    base = ["train", "--model", "hvae", "--data", "digits", "--hidden", "4,8", "--epochs", "0", "--quiet",
            "--no-report", "--out", str(tmp_path / "run")]
    assert main(base + ["--groups", "0,2"]) == 2  # a coarse scale without latents above one with them
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--groups 0,2" in err and "finest scales" in err
    with pytest.raises(SystemExit):
        main(base + ["--groups", "2,-1"])
    assert "integers >= 0 like 4,4,0" in capsys.readouterr().err
    assert main(base + ["--groups", "2,0"]) == 0 and runs.load_config(tmp_path / "run").model.groups == (2, 0)


def test_hvae_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "hvae"
    assert main(["train", "--preset", "hvae-s", "--data", "digits", "--binarize", "dynamic", "--epochs", "1",
                 "--warmup-epochs", "1", "--hidden", "4,8,12", "--latent-dim", "4", "--spectral-reg", "0.01",
                 "--out", str(out), "--no-baselines", "--quiet"]) == 0
    config = runs.load_config(out)
    assert config.model.model == "hvae" and config.model.groups == (4, 4, 0) and config.train.kl_balance
    assert config.train.spectral_reg == 0.01
    capsys.readouterr()  # the preset's model named again keeps its widths; another model is refused, not its groups
    assert main(["train", "--preset", "hvae-s", "--model", "hvae", "--data", "digits", "--epochs", "0", "--quiet",
                 "--no-report", "--out", str(tmp_path / "same")]) == 0
    assert runs.load_config(tmp_path / "same").model.hidden == (16, 32, 64)
    assert main(["train", "--preset", "hvae-s", "--model", "vae", "--data", "digits", "--out",
                 str(tmp_path / "v")]) == 2
    assert "--preset hvae-s configures a --model hvae; drop --model vae, or the preset" in capsys.readouterr().err
    assert (out / "report.html").exists() and (out / "figures" / "kl_per_group.png").exists()
    page = (out / "report.html").read_text()  # encode() gives the top group: its statistics say so
    assert "active units of the top latent group z_1" in page and "I(x; z_1) of the top group &gt;= this" in page
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert len(evaluation["kl_per_group"]) == 8 and len(evaluation["active_units_per_group"]) == 8
    assert sum(evaluation["kl_per_group"]) == pytest.approx(evaluation["test_kl"], rel=1e-5)  # the same draws
    assert main(["evaluate", str(out), "--nll", "--k", "20", "--no-probe"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["nll"] > 0
    assert main(["sample", str(out), "--n", "4", "--temperature", "0.5"]) == 0
    assert main(["interpolate", str(out), "--steps", "4"]) == 0
    model = runs.load(out)  # the spectral buffers are part of the checkpoint and load back
    assert isinstance(model, HVAE)
    evaluation = json.loads((out / "evaluation.json").read_text())  # was 4, the channels per group
    assert evaluation["latent_dim"] == sum(model.group_sizes) and evaluation["latent_top_dim"] == model.latent_dim
    row = compare_runs([out])[1].splitlines()[2]  # and the compare table says whose statistics those are
    assert f"| {evaluation['active_units']} (z_1) |" in row and f"{evaluation['mutual_information']:.3f} (z_1)" in row
    capsys.readouterr()
    for t in ("-1", "1e6"):  # 1e6 wrote a picture of NaN pixels
        assert main(["sample", str(out), "--temperature", t]) == 2
        assert f"--temperature must be between 0 and 10, got {float(t)}" in capsys.readouterr().err
    for t in ("0", "10"):  # the range's ends are taken
        assert main(["sample", str(out), "--n", "2", "--temperature", t, "--out", str(out / f"t{t}.png")]) == 0
    _explorer_serves(out, model.latent_dim)


def _explorer_serves(run_dir, d: int) -> None:
    """The latent explorer on a hierarchy: the top group as z, prior samples with a temperature."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from vaelab.web.app import create_app

    client = TestClient(create_app(run_dir), raise_server_exceptions=False)
    summary = client.get("/api/summary").json()
    assert summary["model"] == "hvae" and summary["temperature"] is True and summary["latent_dim"] == d
    for path in ("/api/samples?n=4&t=0.5", "/api/decode?z=" + ",".join(["0.1"] * d), "/api/interpolate?a=0&b=1&n=3",
                 "/api/reconstruct/0", "/api/map"):
        assert client.get(path).status_code == 200, path
    assert client.get("/api/decode?z=0.1").status_code == 422  # wrong latent length


def test_an_hvae_run_reports_baselines_at_the_size_of_all_its_groups(tmp_path):
    """The report's comparison trains AE and VAE baselines from the run's settings: a hierarchy's groups and
    regularisers used to go along and the report failed after training (--groups is for --model hvae)."""
    out = tmp_path / "hvae"
    assert main(["train", "--preset", "hvae-s", "--data", "digits", "--epochs", "1", "--hidden", "4,8",
                 "--groups", "1,1", "--latent-dim", "2", "--spectral-reg", "0.01", "--out", str(out), "--quiet"]) == 0
    size = sum(runs.load(out).group_sizes)
    for name in ("ae", "vae"):
        config = runs.load_config(out / "baselines" / name)
        assert config.model.latent_dim == size and config.model.groups is None and not config.train.kl_balance
    page = (out / "report.html").read_text()
    assert "PCA, AE, VAE and HVAE at the same latent size" in page
    for name in ("ae", "vae", "hvae"):
        assert f"<td>{name}</td><td>{size}</td><td>" in page
    pca = f"<td>pca</td><td>{size}</td>"
    assert pca in page and ("none: PCA has at most 64 components" in page) == (size > 64)
