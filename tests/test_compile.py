"""--compile: the training step through torch.compile, as one graph, the same bound, and clear failures."""
import dataclasses
import importlib
import warnings

import numpy as np
import pytest
import torch
from test_train import tiny_config, tiny_data

from vaelab import runs
from vaelab.cli import main
from vaelab.errors import TrainingError
from vaelab.models import VAE, build_model
from vaelab.steps import compile_step, objective_for
from vaelab.train import _identity, train

dynamo_counters = pytest.importorskip("torch._dynamo.utils").counters


def test_compile_step_gives_the_model_its_mode_back_even_when_its_eager_pass_fails():
    """Its eager pass (which fills torch.distributions' KL lookup) set eval mode and restored training by hand,
    after the pass: a pass that raised left the model in eval mode (batch norm frozen, no dropout)."""
    model = VAE(input_shape=(1, 6, 6), latent_dim=2, hidden=(16,)).train()

    def refuses(model, x, **kwargs):
        raise ValueError("a refused input")
    with pytest.raises(ValueError, match="a refused input"):
        compile_step(refuses, model, torch.rand(4, 1, 6, 6))
    assert model.training


def test_the_step_is_one_graph_and_kl_warmup_does_not_recompile():
    """One graph (no breaks: the KL lookup is filled eagerly first); new beta values reuse it."""
    torch.manual_seed(0)
    config = tiny_config()
    model = VAE(input_shape=(1, 6, 6), latent_dim=2, hidden=(16,))
    x = torch.rand(16, 1, 6, 6)
    loss_terms = objective_for(config)
    torch._dynamo.reset()
    dynamo_counters.clear()
    step = compile_step(loss_terms, model, x)
    for beta in (0.0, 0.25, 0.5, 1.0):
        loss, (loss_sum, recon, kl) = step(model, x, beta=torch.tensor(beta), free_bits=0.0, kl_balance=False)
        # the analytic KL has no noise in it: eager and compiled agree; the loss weights it by beta
        eager = loss_terms(model, x, beta=beta)
        torch.testing.assert_close(kl, eager["kl"].sum(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(loss_sum, recon + beta * kl, rtol=1e-5, atol=1e-4)
        assert loss.requires_grad and loss.detach() == loss_sum and not loss_sum.requires_grad
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert not dynamo_counters["graph_break"]


@pytest.mark.parametrize("latent_dim", [4, 20])  # log I_v by Hankel's expansion (v = 1), by Debye's (v = 9)
def test_vmf_compiles_around_its_rejection_sampler_without_warnings(tracing_only, latent_dim):
    """Dynamo splits the step only at Wood's sampler (compiler-disabled: a loop that stops on data) and calls
    the Bessel expansions' coefficient tables instead of tracing them; before, both warned on every run."""
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config(), model=dataclasses.replace(tiny_config().model, latent="vmf"))
    model = VAE(input_shape=(1, 6, 6), latent_dim=latent_dim, hidden=(16,), latent="vmf")
    x = torch.rand(16, 1, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = compile_step(objective_for(config), model, x)
        for beta in (0.5, 1.0):
            loss, totals = step(model, x, beta=torch.tensor(beta), free_bits=0.0, kl_balance=False)
            loss.backward()
    assert not [str(w.message) for w in caught]
    assert torch.isfinite(totals).all() and all(p.grad is not None for p in model.parameters())
    breaks = list(dynamo_counters["graph_break"])
    assert breaks and all("_accepted_beta" in reason for reason in breaks)


def test_the_step_compiles_where_layers_take_onednn(monkeypatch):
    """On AMD CPUs with AVX-512 vaelab's layers call oneDNN's linear op, which inductor lowers only for frozen
    weights: --compile failed there with a bare AssertionError. Compiled steps take F.linear instead, in one graph."""
    from vaelab import linear as vlinear
    if vlinear._LINEAR is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(vlinear, "PREFER_ONEDNN", True)  # as on an AMD EPYC with AVX-512
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 32, 32), latent_dim=2, hidden=(64,))
    x = torch.rand(64, 1, 32, 32)  # 64 x 1024 x 64 multiply-adds: above vaelab.linear.MIN_MACS
    assert model.encoder(x).grad_fn.name() == "_OneDNNChainBackward"  # eagerly, the oneDNN path
    loss_terms = objective_for(tiny_config())
    torch._dynamo.reset()
    dynamo_counters.clear()
    step = compile_step(loss_terms, model, x)
    loss, (loss_sum, recon, kl) = step(model, x, beta=torch.tensor(1.0), free_bits=0.0, kl_balance=False)
    loss.backward()
    # one graph: the check for oneDNN read torch's mkldnn switch first, and dynamo broke the graph there
    assert dynamo_counters["stats"]["unique_graphs"] == 1 and not dynamo_counters["graph_break"]
    torch.testing.assert_close(kl, loss_terms(model, x, beta=1.0)["kl"].sum(), rtol=1e-4, atol=1e-3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_compiled_training_lowers_the_loss_and_saves_plain_weights(tmp_path):
    model = train(tiny_config(epochs=4, compile=True), tmp_path / "run", dataset=tiny_data(), progress=False)
    records = runs.read_metrics(tmp_path / "run")
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    loaded = runs.load(tmp_path / "run")
    assert loaded.state_dict().keys() == model.state_dict().keys()  # no _orig_mod. prefixes
    assert runs.load_config(tmp_path / "run").train.compile


def test_the_short_last_batch_of_an_epoch_runs_eagerly_instead_of_compiling_again(tmp_path, tracing_only,
                                                                                  monkeypatch):
    """67 training examples in batches of 16: four full batches and one of 3 per epoch. Its own graph took as
    long to compile as the first (~70 s for the text VAE's traced RNNs) to save part of a step per epoch."""
    training = importlib.import_module("vaelab.train")  # (vaelab.train is also the function)

    sizes = []
    eager = training.step_loss

    def counted(loss_terms, net, x, **kwargs):
        sizes.append(x.shape[0])
        return eager(loss_terms, net, x, **kwargs)
    monkeypatch.setattr(training, "step_loss", counted)  # the trainer's eager step (compile_step has its own)
    train(tiny_config(epochs=2, compile=True), tmp_path / "run", dataset=tiny_data(), progress=False)
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert sizes == [3, 3]  # once per epoch, and only the short batch
    assert runs.is_complete(tmp_path / "run")


def test_a_compiler_failure_is_one_line_that_names_the_flag(tmp_path, monkeypatch):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(TrainingError, match=r"^--compile: .*InvalidCxxCompiler.*train without --compile$"):
        train(tiny_config(compile=True), tmp_path / "run", dataset=tiny_data(), progress=False)


def test_running_out_of_memory_in_the_first_compiled_step_is_named_as_such(tmp_path, monkeypatch):
    def allocating(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 85899345920 bytes. Error code 12 (Cannot allocate memory)")
        return run

    monkeypatch.setattr(torch, "compile", allocating)
    with pytest.raises(TrainingError, match=r"^out of memory on cpu in epoch 1 .*free memory \(or train without "
                                            r"--compile, which --resume may change\) and --resume"):
        train(tiny_config(compile=True), tmp_path / "run", dataset=tiny_data(), progress=False)


def test_resume_may_turn_compile_on_or_off():
    config = tiny_config()
    assert _identity(config) == _identity(dataclasses.replace(config, train=dataclasses.replace(
        config.train, compile=True)))


def test_cli_train_with_compile(tmp_path):
    data = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (80, 8, 8), dtype=np.uint8))
    out = tmp_path / "run"
    assert main(["train", "--data", f"npz:{data}", "--hidden", "16", "--latent-dim", "2", "--epochs", "2",
                 "--batch-size", "32", "--compile", "--no-report", "--quiet", "--out", str(out)]) == 0
    assert runs.load_config(out).train.compile and runs.is_complete(out)


def test_the_hvae_step_with_kl_balancing_is_one_graph_and_balances_only_during_warmup(tracing_only):
    """KL balancing applies while beta < 1; with beta a tensor (the compiled step's) that test was a
    data-dependent branch, a graph break in every step of the hvae-s preset. Now a torch.where: one graph, and
    the same loss as the eager step on the same draws (tracing only: backend="eager" keeps the random stream)."""
    from test_hvae import small

    model = small().train()
    x = (torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    config = dataclasses.replace(tiny_config(), model=dataclasses.replace(
        tiny_config().model, model="hvae", net="conv", hidden=(8, 12), latent_dim=3, groups=(1, 2)))
    loss_terms = objective_for(config)
    step = compile_step(loss_terms, model, x)
    for beta in (0.25, 1.0):
        torch.manual_seed(1)
        _, (loss_sum, recon, kl) = step(model, x, beta=torch.tensor(beta), free_bits=0.0, kl_balance=True)
        torch.manual_seed(1)
        eager = loss_terms(model, x, beta=beta, kl_balance=True)
        torch.testing.assert_close(loss_sum, eager["loss"].sum())
        torch.manual_seed(1)
        plain = loss_terms(model, x, beta=beta, kl_balance=False)["loss"].sum()
        assert (loss_sum != plain) == (beta < 1)  # balanced only during warm-up
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert not dynamo_counters["graph_break"]


def test_a_step_with_free_bits_is_one_graph(tracing_only):
    """Free bits charge KLs per latent unit, a KL lookup of its own (Normal against Normal) that the warm-up
    pass did not make: dynamo broke the step at torch.distributions' min() over a generator, six graphs."""
    torch.manual_seed(0)
    model = VAE(input_shape=(1, 6, 6), latent_dim=2, hidden=(16,))
    x = torch.rand(16, 1, 6, 6)
    loss_terms = objective_for(tiny_config(free_bits=0.1))
    step = compile_step(loss_terms, model, x, free_bits=0.1, kl_balance=False)
    for beta in (0.5, 1.0):
        torch.manual_seed(1)
        loss, (loss_sum, _, _) = step(model, x, beta=torch.tensor(beta), free_bits=0.1, kl_balance=False)
        torch.manual_seed(1)
        torch.testing.assert_close(loss_sum, loss_terms(model, x, beta=beta, free_bits=0.1)["loss"].sum())
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert not dynamo_counters["graph_break"]


@pytest.mark.parametrize("model_args,train_args", [
    ({"bn_mu": 0.5}, {}), ({"activation": "gated"}, {}), ({"net": "conv", "hidden": (4, 8)}, {}),
    ({"likelihood": "gaussian-learned"}, {}), ({}, {"objective": "iwae", "k": 3}), ({"model": "ae"}, {}),
    ({"model": "hvae", "net": "conv", "hidden": (8, 12), "groups": (1, 2), "latent_dim": 3},
     {"spectral_reg": 0.01, "kl_balance": True}),
], ids=["bn-vae", "gated", "conv", "learned-scale", "iwae", "ae", "hvae-spectral"])
def test_each_model_s_step_is_one_graph(tracing_only, model_args, train_args):
    base = tiny_config()
    config = dataclasses.replace(base, model=dataclasses.replace(base.model, input_shape=(1, 12, 12), **model_args),
                                 train=dataclasses.replace(base.train, **train_args))
    torch.manual_seed(0)
    model = build_model(config.model).train()
    x = torch.rand(8, 1, 12, 12)
    options = {"free_bits": config.train.free_bits, "kl_balance": config.train.kl_balance}
    step = compile_step(objective_for(config), model, x, **options)
    for beta in (0.5, 1.0):
        loss, totals = step(model, x, beta=torch.tensor(beta), **options)
        loss.backward()
    assert torch.isfinite(totals).all()
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert not dynamo_counters["graph_break"]


@pytest.mark.parametrize("net", ["lstm", "gru"])
def test_the_text_vae_step_is_one_graph_with_its_rnns_traced(tracing_only, net):
    """dynamo leaves nn.LSTM/GRU out of its graphs unless allow_rnn is set: the step was nine graphs. compile_step
    sets it for models with RNNs while it traces (only then: the global setting is left as it was)."""
    from test_text import tiny_model, tiny_text

    model = tiny_model(net=net).train()
    x = tiny_text().train.x[:16]
    config = dataclasses.replace(tiny_config(), model=dataclasses.replace(
        tiny_config().model, model="text-vae", net=net, hidden=(32,), latent_dim=4, embedding_dim=16))
    loss_terms = objective_for(config)
    step = compile_step(loss_terms, model, x, free_bits=0.0, kl_balance=False)
    torch.manual_seed(1)
    loss, (loss_sum, _, _) = step(model, x, beta=torch.tensor(1.0), free_bits=0.0, kl_balance=False)
    loss.backward()
    torch.manual_seed(1)
    torch.testing.assert_close(loss_sum, loss_terms(model, x, beta=1.0)["loss"].sum())
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert not dynamo_counters["graph_break"] and not torch._dynamo.config.allow_rnn


def test_a_torchrun_job_compiles_without_dynamo_s_profiler_note(tmp_path):
    """Under torchrun every process printed "[rankN]:W... Profiler record function <class ...record_function> will
    be ignored": dynamo's note about DistributedDataParallel.forward's profiler range. Here a job of one process
    (a gloo group of one) compiles a DDP-wrapped step: the note is dropped, and only within the step's calls.

    Listened for wherever torch logs: were a later torch to say it from another logger or in other words,
    vaelab's filter (on that logger, for that text) would miss it, and so would a handler on that logger alone."""
    import logging

    from torch._logging._internal import warning_once
    from torch.nn.parallel import DistributedDataParallel

    dynamo_contexts_log = logging.getLogger("torch._dynamo.variables.ctx_manager")  # where dynamo says it
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    # a record climbs the loggers up to the first that does not propagate (torch, torch._dynamo, ... each have
    # their own stderr handler), else to the root: a handler on each of those hears every torch logger
    tops = [logging.getLogger(), *(logging.getLogger(name) for name in ["torch", *logging.root.manager.loggerDict]
                                   if name.split(".")[0] == "torch" and not logging.getLogger(name).propagate)]
    for log in tops:
        log.addHandler(handler)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        torch.manual_seed(0)
        model = VAE(input_shape=(1, 6, 6), latent_dim=2, hidden=(16,))
        net = DistributedDataParallel(model)
        x = torch.rand(16, 1, 6, 6)
        torch._dynamo.reset()
        warning_once.cache_clear()  # dynamo says it once per process
        step = compile_step(objective_for(tiny_config()), net, x)
        loss, _ = step(net, x, beta=torch.tensor(1.0), free_bits=0.0, kl_balance=False)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        assert not [r.getMessage() for r in records if "profiler" in r.getMessage().lower()], "the note came through"
        assert not dynamo_contexts_log.filters  # left as it was
        # outside the step, the note is dynamo's to give (the filter does not stay behind)
        warning_once.cache_clear()
        dynamo_contexts_log.warning("Profiler record function %s will be ignored", "f")
        assert [r.getMessage() for r in records][-1:] == ["Profiler record function f will be ignored"]
    finally:
        for log in tops:
            log.removeHandler(handler)
        torch.distributed.destroy_process_group()
