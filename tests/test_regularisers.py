"""Cures for KL vanishing: free bits and BN-VAE, checked against their defining formulas and bounds."""
import pytest
import torch

from vaelab.config import ModelConfig, RunConfig, TrainConfig
from vaelab.errors import ConfigError
from vaelab.models import VAE
from vaelab.objectives import elbo


def test_free_bits_charges_at_least_lambda_per_unit_and_stops_their_gradient():
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 4, 4), latent_dim=4, hidden=(8,))
    x = torch.bernoulli(torch.full((16, 1, 4, 4), 0.5))
    with torch.no_grad():
        model.posterior.mean.weight[:2] *= 30  # units 0, 1 carry information; 2, 3 barely any
    torch.manual_seed(1)
    out = model(x)
    lam = 0.5
    terms = elbo(out, x, free_bits=lam)
    per_unit = out.kl_units().mean(0)  # (U,)
    assert per_unit[:2].min() > lam > per_unit[2:].max()
    expected = terms["recon"].mean() + torch.clamp(per_unit, min=lam).sum()
    torch.testing.assert_close(terms["loss"].mean(), expected)
    torch.testing.assert_close(terms["kl"], out.kl())  # the reported KL is the true one
    # units under the floor send no gradient through the KL: with every unit under a huge floor,
    # the gradient of the loss is the reconstruction term's alone
    torch.manual_seed(1)
    model.zero_grad()
    elbo(model(x), x, free_bits=100.0)["loss"].mean().backward()
    with_floor = model.posterior.logvar.weight.grad.clone()
    torch.manual_seed(1)
    model.zero_grad()
    (-model(x).log_px_z(x)).mean().backward()
    torch.testing.assert_close(with_floor, model.posterior.logvar.weight.grad)


def test_bn_vae_keeps_the_expected_kl_above_its_bound():
    """Zhu et al. 2020: with BN on the means, E_x[KL] >= D * gamma^2 / 2, whatever the encoder."""
    torch.manual_seed(0)
    gamma, d = 0.6, 8
    model = VAE(input_shape=(1, 4, 4), latent_dim=d, hidden=(8,), bn_mu=gamma)
    with torch.no_grad():
        model.posterior.logvar.weight.zero_()  # unit variances: the KL is then all in the means,
        model.posterior.logvar.bias.zero_()  # and at initialisation they barely vary with x (Var ~ 2e-3)
    x = torch.rand(256, 1, 4, 4)
    model.train()
    qz = model.encode(x)
    mu = qz.mean
    # BN's eps (1e-12) against Var(mu) ~ 2e-3 shrinks nothing
    torch.testing.assert_close(mu.std(0, unbiased=False), torch.full((d,), gamma), atol=1e-4, rtol=0)
    kl = model(x).kl().mean()
    assert kl >= 0.999 * d * gamma**2 / 2
    assert model.posterior.bn_beta.requires_grad and not any(
        p is model.posterior.bn_gamma for p in model.parameters())  # gamma is fixed, beta learned
    plain = VAE(input_shape=(1, 4, 4), latent_dim=d, hidden=(8,))
    with torch.no_grad():
        plain.posterior.mean.bias.zero_()
        plain.posterior.logvar.weight.zero_()
        plain.posterior.logvar.bias.zero_()
    assert plain(x).kl().mean() < 0.25 * d * gamma**2 / 2  # without BN the same encoder pays far less


def test_bn_vae_bound_survives_adam_training_of_a_decoder_that_ignores_z():
    """Regression: with BN's default eps the encoder learnt constant means under Adam and the KL vanished anyway."""
    torch.manual_seed(0)
    gamma, d = 0.5, 8
    model = VAE(input_shape=(1, 4, 4), latent_dim=d, hidden=(16,), bn_mu=gamma)
    with torch.no_grad():  # the decoder cannot use z: only the KL speaks to the encoder's means
        next(m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)).weight.zero_()
    model.decoder.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.bernoulli(torch.full((64, 1, 4, 4), 0.5))
    for _ in range(300):
        loss = elbo(model(x), x)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(x).kl().mean() >= 0.99 * d * gamma**2 / 2


def test_configs_refuse_meaningless_combinations():
    with pytest.raises(ConfigError, match="--kappa"):
        ModelConfig(kappa=10.0)
    from vaelab.config import RunConfig, check_trainable

    for kappa in (1e10, 1e-50):  # log q(z|x) of float32 codes lost its digits: a test NLL of +1154 nats at 1e10
        config = RunConfig(model=ModelConfig(latent="vmf", kappa=kappa))  # (a stored run with it still loads)
        with pytest.raises(ConfigError, match=r"--kappa .* is outside \[1e-8, 1e5\]: above it a float32 code"):
            check_trainable(config)
    for kappa in (1e-8, 1e5):  # the range's ends are taken
        check_trainable(RunConfig(model=ModelConfig(latent="vmf", kappa=kappa)))
    with pytest.raises(ConfigError, match="--bn-mu"):
        ModelConfig(latent="vmf", bn_mu=0.5)
    with pytest.raises(ConfigError, match="--latent-dim"):
        ModelConfig(latent="vmf", latent_dim=1)
    with pytest.raises(ConfigError, match="--free-bits"):
        TrainConfig(objective="iwae", free_bits=1.0)
    with pytest.raises(ConfigError, match="choose one"):
        TrainConfig(kl_cycles=2, warmup_epochs=3)
    with pytest.raises(ConfigError, match="--bn-mu .* needs --batch-size >= 2, got 1"):  # was BatchNorm1d's error
        RunConfig(model=ModelConfig(bn_mu=0.5), train=TrainConfig(batch_size=1))
    RunConfig(model=ModelConfig(bn_mu=0.5), train=TrainConfig(batch_size=2))


def test_bn_vae_skips_a_one_example_tail_batch_and_refuses_one_example_in_training_mode(tmp_path):
    """67 training examples in batches of 33: the epoch's last batch holds one, whose batch statistics BatchNorm1d
    refuses. It was a traceback at the end of the first epoch; it is skipped, as DDP's too-short tails are."""
    from test_train import tiny_data

    from vaelab import runs
    from vaelab.config import DataConfig
    from vaelab.errors import InputError
    from vaelab.train import train

    config = RunConfig(data=DataConfig(name="tiny"), model=ModelConfig(hidden=(8,), latent_dim=2, bn_mu=0.5),
                       train=TrainConfig(epochs=2, batch_size=33))
    model = train(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "run")] == [1, 2]
    pairs = RunConfig(data=config.data, model=config.model, train=TrainConfig(epochs=1, batch_size=2))  # 33 + 1
    train(pairs, tmp_path / "pairs", dataset=tiny_data(), progress=False)
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "pairs")] == [1]
    with pytest.raises(InputError, match="at least 2 examples, got 1; call model.eval"):
        model.train().encode(torch.rand(1, 1, 6, 6))
    assert model.eval().encode(torch.rand(1, 1, 6, 6)).mean.shape == (1, 2)
