"""The trainer: determinism, resume, checkpoints, NaN handling, save/load and configs."""
import dataclasses
import html
import json
import os
import re
import shutil
import time
import warnings

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import vaelab
from vaelab import runs, stops
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import Dataset, Split
from vaelab.errors import CheckpointError, ConfigError, DataError, TrainingError
from vaelab.prepare import prepare_data
from vaelab.schedules import cosine_rate, kl_weight, learning_rate, resume_note
from vaelab.train import Trainer, train


def tiny_data(n=96, shape=(1, 6, 6), seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    cut1, cut2 = int(n * 0.7), int(n * 0.85)
    return Dataset(name="tiny", train=Split(x[:cut1], y[:cut1]), val=Split(x[cut1:cut2], y[cut1:cut2]),
                   test=Split(x[cut2:], y[cut2:]), classes=("a", "b", "c"))


def tiny_config(**train) -> RunConfig:
    return RunConfig(data=DataConfig(name="tiny", binarize="dynamic"),
                     model=ModelConfig(model="vae", hidden=(16,), latent_dim=2),
                     train=TrainConfig(**{"epochs": 3, "batch_size": 16, "warmup_epochs": 1, **train}))


def weights(model):
    return {k: v.clone() for k, v in runs.unwrap(model).state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_lowers_the_loss_and_writes_the_run_directory(tmp_path):
    model = train(tiny_config(epochs=4), tmp_path / "run", dataset=tiny_data(), progress=False)
    records = runs.read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert {"train_loss", "train_recon", "train_kl", "val_loss", "val_recon", "val_kl", "beta"} <= records[0].keys()
    assert (tmp_path / "run" / "config.json").exists()
    checkpoint = runs.latest_checkpoint(tmp_path / "run")
    assert checkpoint.epoch == 4 and checkpoint.state["complete"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("epoch-*")) == ["epoch-0003", "epoch-0004"]
    assert not model.training


def test_same_seed_same_weights_and_different_seed_differs(tmp_path):
    a = train(tiny_config(), tmp_path / "a", dataset=tiny_data(), progress=False)
    b = train(tiny_config(), tmp_path / "b", dataset=tiny_data(), progress=False)
    c = train(tiny_config(seed=1), tmp_path / "c", dataset=tiny_data(), progress=False)
    assert_same_weights(weights(a), weights(b))
    assert not torch.equal(weights(a)["encoder.body.0.weight"], weights(c)["encoder.body.0.weight"])


def test_seed_takes_torchs_whole_range(tmp_path):
    """--seed refused 2**63 .. 2**64 - 1, which torch.manual_seed takes (vaelab sample took them): the check's comment
    said torch took only signed 64-bit seeds. The largest trains, with the static binarisation it also seeds."""
    config = tiny_config(epochs=1, seed=2**64 - 1)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, binarize="static"))
    train(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "run")] == [1]
    with pytest.raises(ConfigError, match=r"^--seed must be below 2\*\*64, got 18446744073709551616$"):
        TrainConfig(seed=2**64)


def test_resume_continues_to_the_same_result_as_an_uninterrupted_run(tmp_path):
    full = train(tiny_config(epochs=4), tmp_path / "full", dataset=tiny_data(), progress=False)
    train(tiny_config(epochs=2), tmp_path / "cut", dataset=tiny_data(), progress=False)
    resumed = train(tiny_config(epochs=4), tmp_path / "cut", resume=True, dataset=tiny_data(), progress=False)
    assert_same_weights(weights(full), weights(resumed))
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    full_metrics = runs.read_metrics(tmp_path / "full")
    cut_metrics = runs.read_metrics(tmp_path / "cut")
    assert [r["val_loss"] for r in full_metrics] == [r["val_loss"] for r in cut_metrics]
    # killed after epoch 4's metrics line but before its checkpoint: latest.json still says epoch 3
    (tmp_path / "cut" / "checkpoints" / "latest.json").write_text('{"epoch": 3, "dir": "epoch-0003"}')
    train(tiny_config(epochs=4), tmp_path / "cut", resume=True, dataset=tiny_data(), progress=False)
    def losses(records):
        return [(r["epoch"], r["train_loss"], r["val_loss"]) for r in records]
    assert losses(runs.read_metrics(tmp_path / "cut")) == losses(full_metrics)  # epoch 4 once, not twice


def test_resume_with_a_lower_learning_rate_fine_tunes_from_the_checkpoint(tmp_path):
    train(tiny_config(epochs=2), tmp_path / "run", dataset=tiny_data(), progress=False)
    before = weights(vaelab.load(tmp_path / "run"))
    trainer = Trainer(tiny_config(epochs=3, lr=1e-4), tmp_path / "run", dataset=tiny_data(), progress=False)
    trainer.fit(resume=True)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-4]  # not the 1e-3 saved with Adam's state
    assert trainer.optimizer.state  # Adam's moments were carried over, not restarted
    assert [r["lr"] for r in runs.read_metrics(tmp_path / "run")] == [1e-3, 1e-3, 1e-4]
    assert runs.load_config(tmp_path / "run").train.lr == 1e-4
    after = weights(vaelab.load(tmp_path / "run"))
    step = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < step < 0.01  # one epoch of Adam steps of about 1e-4 each
    # a finished run resumed to the epochs it has trains nothing, and keeps the rate it was trained with
    Trainer(tiny_config(epochs=3, lr=1e-5), tmp_path / "run", dataset=tiny_data(), progress=False).fit(resume=True)
    assert runs.load_config(tmp_path / "run").train.lr == 1e-4
    assert [r["lr"] for r in runs.read_metrics(tmp_path / "run")] == [1e-3, 1e-3, 1e-4]


def test_cosine_schedule_anneals_the_rate_at_every_step(tmp_path):
    config = tiny_config(epochs=4, lr=1e-2, lr_schedule="cosine", lr_min=1e-4)
    assert learning_rate(config.train, 0) == pytest.approx(1e-2)
    assert learning_rate(config.train, 2) == pytest.approx((1e-2 + 1e-4) / 2)
    assert learning_rate(config.train, 4) == pytest.approx(1e-4)
    assert learning_rate(tiny_config(lr=3e-3).train, 2.5) == 3e-3  # constant: --lr throughout
    trainer = Trainer(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    trainer.fit()
    steps = 5  # 67 training examples in batches of 16
    last = [cosine_rate(1e-2, 1e-4, (epoch - 1 / steps) / 4) for epoch in range(1, 5)]
    assert [r["lr"] for r in runs.read_metrics(tmp_path / "run")] == pytest.approx(last)  # each epoch's last step
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(last[-1])
    with pytest.raises(ConfigError, match="--lr-min"):
        tiny_config(lr=1e-3, lr_schedule="cosine", lr_min=1e-2)
    assert learning_rate(tiny_config(lr=1e-3, lr_schedule="cosine", lr_min=1e-3).train, 2) == 1e-3  # (flat) taken
    with pytest.raises(ConfigError, match="--lr-schedule"):
        tiny_config(lr_schedule="step")


def test_resume_with_other_epochs_says_how_the_cosine_and_the_kl_cycles_move(tmp_path, capsys):
    config = tiny_config(epochs=2, lr_schedule="cosine", warmup_epochs=0, kl_cycles=2)
    train(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    last = runs.read_metrics(tmp_path / "run")[-1]
    assert last["lr"] < 1e-4 and last["beta"] == 1.0  # the end of the rate's cosine and of the second cycle
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=3))
    train(longer, tmp_path / "run", resume=True, dataset=tiny_data(), progress=False)  # --quiet: still said
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert note == [f"note: --epochs 3 (was 2) spreads the run's schedule over the new length: after epoch 2, the "
                    f"learning rate goes from {last['lr']:.3g} to 0.00025; the KL cycles last 1.5 epochs (were 1) "
                    "and the KL weight goes from 1 to 0.667"]
    assert runs.read_metrics(tmp_path / "run")[-1]["beta"] == 1.0  # the new cycle rose over epoch 3
    # the same length, a constant rate and a plain warm-up are not moved by --epochs: nothing to say
    assert resume_note(config.train, config.train, 2, last) is None
    warm = tiny_config(epochs=2)
    assert resume_note(warm.train, dataclasses.replace(warm.train, epochs=5), 2, last) is None
    cycles = dataclasses.replace(config.train, epochs=4, lr_schedule="constant")
    assert resume_note(cycles, dataclasses.replace(cycles, epochs=8), 2, last) == (  # stopped after 2 of 4 epochs
        "note: --epochs 8 (was 4) spreads the run's schedule over the new length: after epoch 2, the KL cycles "
        "last 4 epochs (were 2) and the KL weight goes from 0 to 1")  # its second cycle would have begun here
    assert resume_note(cycles, dataclasses.replace(cycles, epochs=10), 3, last) == (
        "note: --epochs 10 (was 4) spreads the run's schedule over the new length: after epoch 3, the KL cycles "
        "last 5 epochs (were 2)")  # the weight holds at 1 in both: half-way through a cycle, and 60% through one


def test_resume_refuses_other_settings_and_fresh_start_refuses_an_existing_run(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    with pytest.raises(TrainingError, match=r"settings differ.*\(train.batch_size 16 in the run, 8 here\)"):
        train(tiny_config(epochs=2, batch_size=8), tmp_path / "run", resume=True, dataset=tiny_data(),
              progress=False)
    with pytest.raises(CheckpointError, match="not a directory"):
        train(tiny_config(), tmp_path / "nothing", resume=True, dataset=tiny_data(), progress=False)
    # data that now reads in another shape of as many pixels (RGBA arrays read channels-first before 2026-11-30):
    # an MLP's weights fit, and the resume trained on transposed pixels, rewriting input_shape
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["model"]["input_shape"] = [6, 1, 6]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainingError, match=r"--resume: tiny now reads as examples of shape \(1, 6, 6\), the run "
                                            r"trained on \(6, 1, 6\): the data changed, or how vaelab reads it"):
        train(tiny_config(epochs=2), tmp_path / "run", resume=True, dataset=tiny_data(), progress=False)


def test_save_then_load_gives_identical_outputs(tmp_path):
    model = train(tiny_config(), tmp_path / "run", dataset=tiny_data(), progress=False)
    loaded = vaelab.load(tmp_path / "run")
    x = tiny_data().test.x
    torch.testing.assert_close(loaded.encode(x).mean, model.encode(x).mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(x).stddev, model.encode(x).stddev, rtol=0, atol=0)
    z = torch.randn(5, 2)
    torch.testing.assert_close(loaded.decode(z).mean, model.decode(z).mean, rtol=0, atol=0)
    assert loaded.sample(4).shape == (4, 1, 6, 6)


def test_checkpoint_files_hold_no_code_and_no_wrapper_prefixes(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    checkpoint = runs.latest_checkpoint(tmp_path / "run")
    from safetensors.torch import load_file

    keys = load_file(checkpoint.path / "model.safetensors").keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    torch.load(checkpoint.path / "optimizer.pt", weights_only=True)  # plain tensors only
    json.loads((checkpoint.path / "trainer.json").read_text())


def full_disk(path, text):
    """An atomic_write_text that finds the disk full."""
    raise OSError(28, "No space left on device", str(path))


def test_interrupted_checkpoint_write_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    model = train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    before = runs.latest_checkpoint(tmp_path / "run")

    def assert_last_good_kept():
        after = runs.latest_checkpoint(tmp_path / "run")
        assert after.path == before.path and after.epoch == 1
        assert not list((tmp_path / "run" / "checkpoints").glob(".*partial"))  # no debris

    # each writer's own way of saying the disk is full: tracebacks, the last with no file to name; and no room
    # for the temporary folder itself (there is none to clean up then)
    writers = {"save_file": (runs, "save_file"), "torch_save": (runs.torch, "save"),
               "mkdtemp": (runs.tempfile, "mkdtemp")}
    for writer, error in (("save_file", SafetensorError("Error while serializing: No space left on device (os "
                                                        "error 28)")),
                          ("save_file", OSError(28, "No space left on device")),
                          ("torch_save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                      "4661376 vs 4661264")),
                          ("mkdtemp", OSError(28, "No space left on device"))):
        def crash(*args, _error=error, **kwargs):
            raise _error
        with monkeypatch.context() as patch:
            patch.setattr(*writers[writer], crash)
            with pytest.raises(CheckpointError, match=r"cannot write checkpoint epoch-0002 into .*checkpoints \(.*\); "
                                                      r"the last good checkpoint is intact: free space there and "
                                                      r"--resume$"):
                runs.save_checkpoint(tmp_path / "run", model=model, optimizer=torch.optim.Adam(model.parameters()),
                                     state={"epoch": 2})
        assert_last_good_kept()

    def cuda_error(*args, **kwargs):
        raise RuntimeError("CUDA error")

    with monkeypatch.context() as patch:  # torch's other RuntimeErrors are no full disk: they go up as they are
        patch.setattr(runs.torch, "save", cuda_error)
        with pytest.raises(RuntimeError, match="^CUDA error$"):
            runs.save_checkpoint(tmp_path / "run", model=model, optimizer=torch.optim.Adam(model.parameters()),
                                 state={"epoch": 2})
    assert_last_good_kept()
    vaelab.load(tmp_path / "run")


def test_run_files_that_cannot_be_written_at_start_or_resume_are_one_line(tmp_path, monkeypatch):
    """Rank 0 wrote config.json (new runs) and metrics.jsonl (resumes) outside the work every process waits on:
    under torchrun a full disk there left the other processes waiting for a peer that had gone. Here one process
    checks the one-line error that _by_rank_0 gives every process (the torchrun tests check its spreading)."""
    with monkeypatch.context() as patch:
        patch.setattr("vaelab.config.atomic_write_text", full_disk)
        with pytest.raises(CheckpointError, match=r"^could not write config\.json: No space left on device: .*conf"):
            train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    train(tiny_config(epochs=1), tmp_path / "ok", dataset=tiny_data(), progress=False)
    monkeypatch.setattr(runs, "atomic_write_text", full_disk)
    with pytest.raises(CheckpointError, match=r"^could not resume the run: No space left on device: .*metrics"):
        train(tiny_config(epochs=2), tmp_path / "ok", resume=True, dataset=tiny_data(), progress=False)


def test_truncated_or_tampered_checkpoints_give_clear_errors(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    path = runs.latest_checkpoint(tmp_path / "run").path
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or tampered"):
        vaelab.load(tmp_path / "run")
    (path / "model.safetensors").write_bytes(data)
    (path / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        train(tiny_config(epochs=2), tmp_path / "run", resume=True, dataset=tiny_data(), progress=False)
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text("{")
    with pytest.raises(CheckpointError, match="damaged"):
        vaelab.load(tmp_path / "run")


def test_a_damaged_checkpoint_names_the_intact_earlier_one_and_following_that_resumes(tmp_path):
    """Runs keep two checkpoints, but the errors said only "truncated or tampered with" (and a missing
    latest.json "no checkpoint; train it first"), as if the run's work were lost."""
    run = tmp_path / "run"
    train(tiny_config(epochs=3), run, dataset=tiny_data(), progress=False)
    root = run / "checkpoints"
    (root / "epoch-0003" / "model.safetensors").write_bytes(b"cut")
    advice = ('the run also holds epoch-0002: to use it, write {"epoch": 2, "dir": "epoch-0002"} into '
              f'{root / "latest.json"}')
    for damage in ("weights", "optimizer", "trainer"):
        with pytest.raises(CheckpointError) as caught:
            if damage == "optimizer":
                (root / "epoch-0003" / "optimizer.pt").write_bytes(b"cut")
                train(tiny_config(epochs=4), run, resume=True, dataset=tiny_data(), progress=False)
            elif damage == "trainer":
                (root / "epoch-0003" / "trainer.json").write_text("{")
                vaelab.load(run)
            else:
                vaelab.load(run)
        assert str(caught.value).endswith(advice), damage
        if damage == "weights":
            (root / "epoch-0003" / "model.safetensors").unlink()
            shutil.copy(root / "epoch-0002" / "model.safetensors", root / "epoch-0003")
    for folder in ("../../elsewhere", "epoch-0009"):  # a pointer edited to a folder out of the run, or not there
        (root / "latest.json").write_text(json.dumps({"epoch": 2, "dir": folder}))
        with pytest.raises(CheckpointError, match=r"which is not a checkpoint folder in ") as caught:
            vaelab.load(run)
        assert str(caught.value).endswith(advice), folder
    (root / "latest.json").write_text("{")  # the pointer itself damaged
    with pytest.raises(CheckpointError, match=r"latest.json is damaged \(") as caught:
        vaelab.load(run)
    assert str(caught.value).endswith(advice)
    (root / "latest.json").unlink()  # no pointer: the newest folder whose trainer.json reads is offered
    with pytest.raises(CheckpointError, match=r"latest.json is missing; the run holds epoch-0002: to use it"):
        vaelab.load(run)
    (root / "latest.json").write_text('{"epoch": 2, "dir": "epoch-0002"}')  # as the message says
    train(tiny_config(epochs=4), run, resume=True, dataset=tiny_data(), progress=False)
    assert runs.latest_checkpoint(run).epoch == 4 and runs.is_complete(run)
    for folder in root.glob("epoch-*"):
        shutil.rmtree(folder)
    (root / "latest.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no checkpoint \(.*latest.json is missing\); train it first$"):
        vaelab.load(run)


def test_malicious_pickle_as_optimizer_state_is_refused(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    path = runs.latest_checkpoint(tmp_path / "run").path
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Evil()}, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        train(tiny_config(epochs=2), tmp_path / "run", resume=True, dataset=tiny_data(), progress=False)
    assert not marker.exists()


def test_optimizer_state_takes_the_layout_of_a_channels_last_parameter(tmp_path):
    """Fused Adam on CPU reads moments as flat memory: contiguous moments of a channels-last weight (a checkpoint
    written before the model went channels-last) would update it with the wrong values unless re-laid out."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    grads = [torch.randn_like(conv.weight) for _ in range(2)]

    def step(optimizer, grad):
        conv.weight.grad = torch.empty_like(conv.weight).copy_(grad)  # in the weight's layout
        conv.bias.grad = torch.ones_like(conv.bias)
        optimizer.step()

    adam = torch.optim.Adam(conv.parameters(), lr=0.1)  # written in the default (contiguous) layout
    step(adam, grads[0])
    runs.save_checkpoint(tmp_path, model=conv, optimizer=adam, state={"epoch": 1})
    start = {k: v.detach().clone() for k, v in conv.state_dict().items()}
    step(adam, grads[1])  # the reference: the for-loop implementation, whatever the layout
    expected = conv.weight.detach().clone()

    conv.load_state_dict(start)
    conv.to(memory_format=torch.channels_last)
    fused = torch.optim.Adam(conv.parameters(), lr=0.1, fused=True)
    runs.load_optimizer(fused, runs.latest_checkpoint(tmp_path))
    assert fused.state[conv.weight]["exp_avg"].stride() == conv.weight.stride()
    step(fused, grads[1])
    torch.testing.assert_close(conv.weight.detach(), expected)


def test_nan_in_the_data_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    grey = DataConfig(name="tiny", binarize="none")  # (binarising would turn the NaN into a 0)
    config = dataclasses.replace(tiny_config(epochs=3), data=grey)
    train(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    good = (runs.latest_checkpoint(tmp_path / "run").path / "model.safetensors").read_bytes()
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=5))
    trainer = Trainer(longer, tmp_path / "run", dataset=tiny_data(), progress=False)
    trainer.train_x[3, 0, 0, 0] = float("nan")  # injected after the data checks, as a fault would be
    with pytest.raises(TrainingError, match="NaN or infinite in epoch 4.*epoch 3"):
        trainer.fit(resume=True)
    checkpoint = runs.latest_checkpoint(tmp_path / "run")
    assert checkpoint.epoch == 3
    assert (checkpoint.path / "model.safetensors").read_bytes() == good


def test_a_non_finite_loss_stops_training_at_the_next_check_and_names_that_step(tmp_path):
    """The loss is checked every PROGRESS_EVERY (20) steps (one sync each): a NaN from the first step stops the run
    after 20 of its 34 steps, and the message says by which step."""
    grey = DataConfig(name="tiny", binarize="none")
    trainer = Trainer(dataclasses.replace(tiny_config(epochs=1, batch_size=2), data=grey), tmp_path / "run",
                      dataset=tiny_data(), progress=False)
    trainer.train_x.fill_(float("nan"))
    step_loss, calls = trainer._step_loss, []
    trainer._step_loss = lambda *a: calls.append(1) or step_loss(*a)
    with pytest.raises(TrainingError, match=r"^the training loss became NaN or infinite in epoch 1 \(by step 20\)"):
        trainer.fit()
    assert len(calls) == 20 and trainer.steps == 34


@pytest.mark.parametrize("fault", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 85899345920 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["cuda", "cpu"])
def test_out_of_memory_in_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, fault):
    config = tiny_config(epochs=2)
    train(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=4))
    trainer = Trainer(longer, tmp_path / "run", dataset=tiny_data(), progress=False)

    def allocate(*args, **kwargs):
        raise fault
    trainer.loss_terms = allocate
    with pytest.raises(TrainingError, match=r"out of memory on cpu in epoch 3 \(--batch-size 16.*\(epoch 2\) is "
                                            r"intact: free memory and --resume, or start a new run with a lower "
                                            r"--batch-size, --hidden \(--resume keeps the run's own\)") as caught:
        trainer.fit(resume=True)
    assert "\n" not in str(caught.value) and caught.value.__cause__ is None
    assert runs.latest_checkpoint(tmp_path / "run").epoch == 2
    trainer = Trainer(longer, tmp_path / "run", dataset=tiny_data(), progress=False)
    trainer.loss_terms = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not dressed up as memory
        trainer.fit(resume=True)


def test_divergent_learning_rate_stops_with_a_clear_message(tmp_path):
    config = RunConfig(data=DataConfig(name="tiny"),
                       model=ModelConfig(model="vae", hidden=(16,), latent_dim=2, likelihood="gaussian-learned"),
                       train=TrainConfig(epochs=3, batch_size=16, lr=1e6))
    with pytest.raises(TrainingError, match="NaN or infinite"):
        train(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    vaelab.load(tmp_path / "run")  # the initial checkpoint is intact and loads


def test_every_validation_pass_draws_the_same_noise(tmp_path):
    """Epochs' validation losses differ by the model alone, not by the z drawn: each pass reseeds its noise."""
    trainer = Trainer(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    first = trainer._validate()
    torch.rand(7)  # the global generator moves on between passes, as training steps move it
    assert trainer._validate() == first and first["kl"] > 0


@pytest.mark.parametrize("where", ["buffer", "optimizer"])
def test_weights_or_optimiser_state_gone_non_finite_under_a_finite_loss_are_not_saved(tmp_path, where):
    """An HVAE's batch-norm running variance overflowed while its validation loss stayed finite: the checkpoint kept
    as the last good one was refused as damaged by every later command. Adam's second moments at inf froze the
    weights under a flat loss, exit 0."""
    config = dataclasses.replace(tiny_config(epochs=3), model=ModelConfig(hidden=(16,), latent_dim=2, bn_mu=0.5))
    trainer = Trainer(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    validate = trainer._validate
    names = [k for k in trainer.model.state_dict() if k.endswith("running_var")]

    def overflowing():
        result = validate()  # finite: the overflow comes after it
        if len(runs.read_metrics(tmp_path / "run")) == 1:  # in epoch 2
            if where == "buffer":
                trainer.model.get_buffer(names[0]).fill_(float("inf"))
            else:
                next(iter(trainer.optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
        return result
    trainer._validate = overflowing
    parameters = "|".join(re.escape(n) for n, _ in trainer.model.named_parameters())  # named, not "parameter 0"
    bad = re.escape(f"model.{names[0]}") if where == "buffer" else f"optimizer state exp_avg_sq of ({parameters})"
    with pytest.raises(TrainingError, match=rf"^the {bad} \(with a finite loss\) became NaN or infinite in "
                                            r"epoch 2 .*last good checkpoint \(epoch 1\).* Lower --lr \(now 0.001; "):
        trainer.fit()
    assert runs.latest_checkpoint(tmp_path / "run").epoch == 1
    vaelab.load(tmp_path / "run")


def edit_trainer_state(run, edit):
    """Rewrite the trainer.json of run's latest checkpoint with edit applied to its dict (e.g. an older vaelab's)."""
    state = runs.latest_checkpoint(run).path / "trainer.json"
    stored = json.loads(state.read_text())
    edit(stored)
    state.write_text(json.dumps(stored))


def test_a_run_that_does_not_record_its_process_count_resumes_with_a_note(tmp_path, capsys):
    """Checkpoints before 2026-12-01 did not record their torchrun job's size: such a run went on with another
    global batch without a word."""
    train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    edit_trainer_state(tmp_path / "run", lambda stored: stored.pop("processes"))
    capsys.readouterr()
    train(tiny_config(epochs=2), tmp_path / "run", resume=True, dataset=tiny_data(), progress=False)
    assert (f"note: {tmp_path / 'run'} does not record how many processes trained it (vaelab before 2026-12-01): "
            "it goes on as a job of 1;") in capsys.readouterr().err
    train(tiny_config(epochs=3), tmp_path / "run", resume=True, dataset=tiny_data(), progress=False)
    assert "record how many processes" not in capsys.readouterr().err  # epoch 2's checkpoint records it


def test_a_finished_run_of_another_process_count_resumes_to_its_own_epochs_only(tmp_path):
    """A torchrun job's size is checked only where training goes on: a finished run trains nothing, so another
    size does not matter there."""
    train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    edit_trainer_state(tmp_path / "run", lambda stored: stored.update(processes=2))
    train(tiny_config(epochs=1), tmp_path / "run", resume=True, dataset=tiny_data(), progress=False)
    with pytest.raises(TrainingError, match=r"was trained on 2 process\(es\), this job has 1"):
        train(tiny_config(epochs=2), tmp_path / "run", resume=True, dataset=tiny_data(), progress=False)


def test_a_warm_up_longer_than_the_run_is_noted(tmp_path, capsys):
    """The KL weight of --warmup-epochs 8 --epochs 2 ended at a quarter of --beta, without a word."""
    train(tiny_config(epochs=2, warmup_epochs=8, beta=2.0), tmp_path / "long", dataset=tiny_data(), progress=False)
    err = capsys.readouterr().err
    assert "note: the KL warm-up (8 epochs) outlasts the run (2 epochs): the KL weight ends at 0.5, not beta 2," in err
    train(tiny_config(epochs=2, warmup_epochs=2), tmp_path / "fits", dataset=tiny_data(), progress=False)
    train(tiny_config(epochs=4, warmup_epochs=2), tmp_path / "fits", resume=True, dataset=tiny_data(), progress=False)
    assert "warm-up" not in capsys.readouterr().err


def test_the_cures_offered_for_a_non_finite_loss_fit_the_run(tmp_path):
    """gaussian-learned was offered to Bernoulli runs and to the runs that had it."""
    for likelihood, sigma in (("bernoulli", False), ("gaussian-learned", False), ("gaussian", True)):
        config = dataclasses.replace(tiny_config(), model=ModelConfig(hidden=(8,), latent_dim=2, likelihood=likelihood))
        cures = stops.cures(config)
        assert cures.startswith("Lower --lr (now 0.001; `--resume --lr X` continues from that checkpoint)")
        assert ("a larger --sigma (now 0.1) or --likelihood gaussian-learned" in cures) == sigma


def test_kl_warmup_is_linear_then_flat():
    assert kl_weight(TrainConfig(beta=2.0), 0.0) == 2.0
    warm = TrainConfig(beta=2.0, warmup_epochs=4)
    assert [kl_weight(warm, t) for t in (0.0, 1.0, 10.0)] == [0.0, 0.5, 2.0]


def test_a_free_bits_floor_above_log_n_is_refused(tmp_path):
    """A unit tells at most log N nats about which of N examples it encodes: above that floor the KL never acts."""
    config = tiny_config(epochs=1, free_bits=1e6)  # 67 training images: log N = 4.2 nats
    with pytest.raises(ConfigError, match=r"--free-bits 1e\+06 is above log N = 4.2 nats for the N = 67 training "
                                          r"examples: .* never act; use a floor below 4.2 .*--beta 0"):
        train(config, tmp_path / "r", dataset=tiny_data(), progress=False)
    assert not (tmp_path / "r").exists()
    just_under = dataclasses.replace(config.train, free_bits=4.2)  # log 67 = 4.205
    train(dataclasses.replace(config, train=just_under), tmp_path / "ok", dataset=tiny_data(), progress=False)


def test_a_run_stopped_before_it_wrote_anything_removes_only_the_folder_it_made(tmp_path, monkeypatch):
    """A new run that stops with its one-line error before writing a file (here a full disk at config.json) leaves
    no trace: the folder it made goes, but an empty folder the user made beforehand (the --out they prepared)
    stays where it was."""
    monkeypatch.setattr("vaelab.config.atomic_write_text", full_disk)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for out in (tmp_path / "new", prepared):
        with pytest.raises(CheckpointError, match=r"^could not write config\.json: No space left on device"):
            train(tiny_config(epochs=1), out, dataset=tiny_data(), progress=False)
    assert not (tmp_path / "new").exists()
    assert prepared.is_dir() and not any(prepared.iterdir())


def test_cyclical_kl_annealing_rises_and_holds_in_every_cycle():
    cyc = TrainConfig(beta=1.0, epochs=8, kl_cycles=2, kl_cycle_ratio=0.5)  # cycles of 4 epochs, rising over 2
    assert [kl_weight(cyc, t) for t in (0.0, 1.0, 2.0, 3.5, 4.0, 5.0, 7.9)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]
    # a cycle's start reached through float steps (i / steps) is its start: 0.3 % 0.1 = 0.0999... read as the end
    ten = TrainConfig(beta=1.0, epochs=1, kl_cycles=5, kl_cycle_ratio=0.5)
    assert [kl_weight(ten, i / 10) for i in range(10)] == [0.0, 1.0] * 5


def test_kl_cycles_whose_rise_is_shorter_than_a_step_are_refused(tmp_path):
    """With one step per cycle each step's weight was 0 or beta as rounding fell; with 100 cycles the KL was off."""
    config = tiny_config(epochs=1, batch_size=8, kl_cycles=3, warmup_epochs=0)  # 67 training images: 9 steps
    with pytest.raises(ConfigError, match=r"--kl-cycles 12: the run has 9 steps, so each cycle has 0.75 and its "
                                          r"rise \(--kl-cycle-ratio 0.5\) 0.38; .*; use at most 4 cycles"):
        train(dataclasses.replace(config, train=dataclasses.replace(config.train, kl_cycles=12)), tmp_path / "r",
              dataset=tiny_data(), progress=False)
    assert not (tmp_path / "r").exists()
    from vaelab.schedules import check_cycles
    check_cycles(TrainConfig(epochs=1, kl_cycles=9, kl_cycle_ratio=0.36), 25)  # the most it suggests is taken
    with pytest.raises(ConfigError, match=r"each cycle has 3 and its rise .* 0.9; .*; use at most 2 cycles"):
        check_cycles(TrainConfig(epochs=1, kl_cycles=3, kl_cycle_ratio=0.3), 9)  # cycles long enough, a short rise
    check_cycles(TrainConfig(epochs=1, kl_cycles=2, kl_cycle_ratio=0.3), 9)
    check_cycles(TrainConfig(epochs=1, kl_cycles=5, kl_cycle_ratio=0.5), 10)  # cycles of exactly 2 steps, a rise of 1
    one_step = dataclasses.replace(config.train, kl_cycles=9, kl_cycle_ratio=1.0)  # a rise of 1 step, at 0 each time
    with pytest.raises(ConfigError, match=r"each cycle has 1 and its rise .* 1; a cycle needs 2 steps"):
        train(dataclasses.replace(config, train=one_step), tmp_path / "r", dataset=tiny_data(), progress=False)
    train(config, tmp_path / "ok", dataset=tiny_data(), progress=False)


def test_warmup_is_logged_and_beta_weights_the_kl(tmp_path):
    data = tiny_data()
    started = time.perf_counter()
    train(tiny_config(epochs=2, warmup_epochs=2, beta=3.0), tmp_path / "run", dataset=data, progress=False)
    wall = time.perf_counter() - started
    records = runs.read_metrics(tmp_path / "run")
    assert 0 < records[0]["beta"] < records[1]["beta"] <= 3.0
    for r in records:  # each epoch's training time, and the throughput over it
        assert 0 < r["seconds"] < wall
        assert r["samples_per_s"] == pytest.approx(len(data.train.x) / r["seconds"])


def test_binarisation_modes(tmp_path):
    data = tiny_data()
    dynamic = prepare_data(tiny_config(), data)
    assert torch.equal(dynamic.train.x, data.train.x)  # resampled per batch, so kept grey
    assert set(dynamic.test.x.unique().tolist()) <= {0.0, 1.0}
    static = prepare_data(RunConfig(data=DataConfig(name="tiny", binarize="static")), data)
    assert set(static.train.x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(static.test.x, dynamic.test.x)  # held-out splits: one fixed seed for every run
    other = prepare_data(RunConfig(data=DataConfig(name="tiny", binarize="static"), train=TrainConfig(seed=5)), data)
    assert not torch.equal(other.train.x, static.train.x)  # the training split follows the run's seed,
    assert torch.equal(other.val.x, static.val.x) and torch.equal(other.test.x, static.test.x)  # held-out ones not
    assert prepare_data(RunConfig(data=DataConfig(name="tiny", binarize="static")), static) is static  # passed on
    with pytest.raises(ConfigError, match=r"'tiny' was prepared for another run \(--binarize static --seed 0\); "
                                          r"pass the data set as loaded"):  # it was binarised again, or used as is
        prepare_data(tiny_config(), static)


def test_data_prepared_for_pca_is_checked_again_for_a_bernoulli_model_and_passed_on(tmp_path):
    """PCA needs finite values only; the report then passed its data on to a Bernoulli VAE baseline, which was
    refused as "prepared for another run" (and, had it been taken, would not have been checked for [0, 1])."""
    pca, vae = RunConfig(data=DataConfig(name="tiny"), model=ModelConfig(model="pca")), RunConfig(data=DataConfig(
        name="tiny"))
    for_pca = prepare_data(pca, tiny_data())
    for_vae = prepare_data(vae, for_pca)
    assert for_vae.train is for_pca.train and prepare_data(pca, for_vae) is for_vae  # checked for [0, 1] is finite
    wide = prepare_data(pca, dataclasses.replace(tiny_data(), train=Split(tiny_data().train.x * 3,
                                                                           tiny_data().train.y)))
    with pytest.raises(DataError, match=r"\(train split\), as --likelihood bernoulli needs values in \[0, 1\]"):
        prepare_data(vae, wide)


def test_pca_and_ae_train_through_the_same_entry_point(tmp_path):
    for name in ("pca", "ae"):
        config = RunConfig(data=DataConfig(name="tiny"), model=ModelConfig(model=name, hidden=(16,), latent_dim=2,
                                                                           likelihood="gaussian"),
                           train=TrainConfig(epochs=2, batch_size=16))
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            model = train(config, tmp_path / name, dataset=tiny_data(), progress=False)
        assert [str(w.message) for w in said if "would be ignored" in str(w.message)] == (
            ["vaelab.train: model.likelihood, model.hidden would be ignored (--model pca is fitted in closed form by "
             "SVD: no network, optimiser, likelihood choice or KL): trained at their defaults, as config.json "
             "records"] if name == "pca" else [])
        assert runs.is_complete(tmp_path / name)
        loaded = vaelab.load(tmp_path / name)
        x = tiny_data().test.x
        torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)
        for record in runs.read_metrics(tmp_path / name):  # no KL term to log: its 0 read as a collapsed posterior
            assert {"val_loss", "val_recon"} <= record.keys() and not {"beta", "train_kl", "val_kl"} & record.keys()


def test_an_autoencoder_s_training_curves_have_no_kl_axis(tmp_path, monkeypatch):
    from vaelab import figures

    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    record = {"epoch": 1, "train_loss": 3.0, "val_loss": 2.0, "val_recon": 2.0}
    figures.training_curves([record], tmp_path / "ae.png")
    figures.training_curves([{**record, "val_kl": 0.5}], tmp_path / "vae.png")
    assert [len(fig.axes) for fig in saved] == [2, 3]  # the VAE's KL on a twin axis


def test_the_python_entry_point_names_a_wrong_config_or_dataset(tmp_path):
    with pytest.raises(ConfigError, match="config must be a vaelab.config.RunConfig, got str"):
        train("digits", tmp_path / "a")  # was AttributeError: 'str' object has no attribute 'data'
    with pytest.raises(ConfigError, match="config must be a vaelab.config.RunConfig, got dict"):
        train(tiny_config().to_dict(), tmp_path / "b")
    with pytest.raises(ConfigError, match="dataset must be a vaelab.data.Dataset.*got Tensor"):
        train(tiny_config(), tmp_path / "c", dataset=torch.rand(10, 1, 6, 6))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_config_json_round_trip_and_strictness(tmp_path):
    config = tiny_config()
    config.save(tmp_path / "config.json")
    assert RunConfig.load(tmp_path / "config.json") == config
    raw = config.to_dict()
    raw["train"]["learning_rate"] = 0.1
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        RunConfig.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.load(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="--latent-dim"):
        ModelConfig(latent_dim=0)
    with pytest.raises(ConfigError, match="--lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match="--likelihood"):
        RunConfig.from_dict({"model": {"likelihood": "poisson"}})
    for section, key, value, says in (("model", "latent_dim", "x", "[model]: --latent-dim must be an integer"),
                                      ("train", "batch_size", 1, "--bn-mu batch-normalises")):
        raw = config.to_dict()  # a value its flag would refuse named the flag alone, not the file
        raw[section][key] = value
        raw["model"]["bn_mu"] = 1.0
        (tmp_path / "bad.json").write_text(json.dumps(raw))
        with pytest.raises(ConfigError) as error:
            RunConfig.load(tmp_path / "bad.json")
        assert str(error.value).startswith(f"{tmp_path / 'bad.json'}: ") and says in str(error.value)


def test_gradient_clipping_bounds_every_step(tmp_path, monkeypatch):
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        total = clip(params, max_norm, *args, **kwargs)
        grads = [p.grad.norm() for p in params if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(tiny_config(epochs=1, grad_clip=0.5), tmp_path / "run", dataset=tiny_data(), progress=False)
    assert norms and max(norms) <= 0.5 + 1e-5


def test_a_grad_clip_under_which_adam_cannot_step_is_refused_before_anything_is_written(tmp_path):
    """Clipped to a global norm c, the gradients' root mean square is at most c / sqrt(parameters); under Adam's
    eps (1e-8) its steps shrink with them: at 1e-30 the loss did not move, without an error."""
    data = tiny_data()
    with pytest.raises(ConfigError, match=r"--grad-clip 1e-30 clips .* under Adam's eps 1e-08, .* give --grad-clip "
                                          r"\S+ or more") as refused:
        train(tiny_config(epochs=1, grad_clip=1e-30), tmp_path / "run", dataset=data, progress=False)
    assert not (tmp_path / "run").exists()
    floor = float(re.search(r"give --grad-clip (\S+) or more", str(refused.value)).group(1))
    model = train(tiny_config(epochs=1, grad_clip=floor * 1.01), tmp_path / "ok", dataset=data, progress=False)
    n = sum(p.numel() for p in model.parameters())
    assert floor == pytest.approx(1e-8 * n**0.5, rel=0.01)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_optimizer_step_matches_adam_step_bit_for_bit(amsgrad):
    """The trainer's fused-Adam step (the fused kernel on the optimizer's own state) is Adam.step()."""
    from vaelab.steps import optimizer_step

    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(20, 30), torch.nn.Linear(20, 30)
    ref.load_state_dict(ours.state_dict())
    ours.bias.requires_grad_(False)  # a frozen parameter: no gradient, no update
    ref.bias.requires_grad_(False)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True, amsgrad=amsgrad, weight_decay=0.1)
            for m in (ours, ref)]
    for step in range(5):
        x = torch.randn(8, 20)
        for model, opt in zip((ours, ref), opts):
            opt.param_groups[0]["lr"] = 1e-2 / (step + 1)  # the trainer's schedules set the rate each step
            model.weight.grad = None
            model(x).square().sum().backward()
        optimizer_step(opts[0])
        opts[1].step()
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    for key in ("step", "exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else [])):
        assert torch.equal(opts[0].state[ours.weight][key], opts[1].state[ref.weight][key]), key
    assert ours.bias not in opts[0].state


def test_optimizer_step_stays_adam_step_through_a_checkpoint_and_new_gradients(tmp_path):
    """Bit for bit Adam.step() over several parameters while the set with gradients changes (a parameter unfrozen
    mid-run) and after the optimiser's state went through torch.save/load, as a checkpoint's does."""
    from vaelab.steps import optimizer_step

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    ref.load_state_dict(ours.state_dict())
    for m in (ours, ref):
        m[2].bias.requires_grad_(False)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (ours, ref)]

    def train(steps):
        for _ in range(steps):
            x = torch.randn(4, 5)
            for model in (ours, ref):
                model.zero_grad(set_to_none=True)
                model(x).square().sum().backward()
            optimizer_step(opts[0])
            opts[1].step()

    train(3)
    for m in (ours, ref):  # the bias gets gradients from now on: its state (step 1) starts beside the others' 4
        m[2].bias.requires_grad_(True)
    train(3)
    torch.save(opts[0].state_dict(), tmp_path / "optimizer.pt")
    opts[0] = torch.optim.Adam(ours.parameters(), lr=1e-2, fused=True)
    opts[0].load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    train(3)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opts[0].state[p][key], opts[1].state[q][key]), key
    assert [int(opts[0].state[p]["step"]) for p in ours.parameters()] == [9, 9, 9, 6]


def test_optimizer_step_advances_the_step_counts_in_one_op():
    """torch's fused Adam adds 1 to each parameter's count (on a CPU an add and two copies per parameter);
    optimizer_step does one add for all of them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vaelab.steps import optimizer_step

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(5)))  # 10 parameters
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        model(torch.randn(2, 4)).sum().backward()
        with Ops() as ops:
            optimizer_step(optimizer)
    assert ops.names.count("add_") == 1 and "_to_copy" not in ops.names, ops.names
    assert "stack" not in ops.names, ops.names  # the counts' tensor is made at the second step, then kept
    assert [int(s["step"]) for s in optimizer.state.values()] == [3] * 10


def test_optimizer_step_with_parameters_of_two_dtypes_is_adam_step():
    from vaelab.steps import optimizer_step

    torch.manual_seed(0)
    ours = [torch.randn(3, requires_grad=True), torch.randn(2, dtype=torch.float64, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = [torch.optim.Adam(ps, lr=0.1, fused=True) for ps in (ours, ref)]
    for _ in range(3):
        for ps in (ours, ref):
            for p in ps:
                p.grad = p.detach().square() + 1
        optimizer_step(opts[0])
        opts[1].step()
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))


def test_optimizer_step_runs_hooks_and_other_optimizers_through_step():
    from vaelab.steps import optimizer_step

    model = torch.nn.Linear(4, 2)
    model(torch.randn(3, 4)).sum().backward()
    calls = []
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.register_step_post_hook(lambda *args: calls.append("sgd"))
    optimizer_step(sgd)
    adam = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    optimizer_step(adam)  # the first step creates the state
    adam.register_step_post_hook(lambda *args: calls.append("adam"))
    optimizer_step(adam)
    assert calls == ["sgd", "adam"] and int(adam.state[model.weight]["step"]) == 2


def test_optimizer_step_leaves_adamw_style_decay_and_global_hooks_to_step():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from vaelab.steps import optimizer_step

    model = torch.nn.Linear(4, 2)
    decoupled = torch.optim.Adam(model.parameters(), lr=0.1, fused=True, weight_decay=0.5,
                                 decoupled_weight_decay=True)
    reference = torch.nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    adamw = torch.optim.AdamW(reference.parameters(), lr=0.1, fused=True, weight_decay=0.5)
    for _ in range(3):
        for m in (model, reference):
            m.zero_grad()
            m(torch.ones(3, 4)).sum().backward()
        optimizer_step(decoupled)
        adamw.step()
    assert torch.equal(model.weight, reference.weight)
    calls = []
    handle = register_optimizer_step_post_hook(lambda *args: calls.append(1))
    try:
        optimizer_step(decoupled)
    finally:
        handle.remove()
    assert calls == [1]


def eight_bit(data: Dataset) -> Dataset:
    """The data set with every pixel rounded to a level k/255."""
    return dataclasses.replace(data, **{name: Split((getattr(data, name).x * 255).round() / 255, getattr(data, name).y)
                                        for name in ("train", "val", "test")})


def dequantized_config(**train) -> RunConfig:
    return dataclasses.replace(tiny_config(**train), data=DataConfig(name="tiny", dequantize=True),
                               model=ModelConfig(model="vae", hidden=(16,), latent_dim=2, likelihood="gaussian"))


def test_dequantize_is_refused_where_it_has_no_meaning():
    for model, data, named in ((ModelConfig(likelihood="bernoulli"), DataConfig(dequantize=True), "--likelihood"),
                               (ModelConfig(likelihood="gaussian"), DataConfig(dequantize=True, binarize="static"),
                                "without --binarize"),
                               (ModelConfig(model="text-vae"), DataConfig(dequantize=True),
                                "not to --model text-vae")):
        with pytest.raises(ConfigError, match=named):
            RunConfig(data=data, model=model)
    with pytest.raises(ConfigError, match="on or off"):
        DataConfig(dequantize="yes")


def test_dequantised_runs_draw_new_noise_per_batch_and_fix_the_held_out_splits_once(tmp_path):
    data = eight_bit(tiny_data())
    prepared = prepare_data(dequantized_config(), data)
    assert torch.equal(prepared.train.x, data.train.x)  # the trainer dequantises each batch
    for name in ("val", "test"):
        x, v = getattr(data, name).x, getattr(prepared, name).x
        assert torch.equal(torch.floor(v * 256), (x * 255).round()) and not torch.equal(v, x)
    assert prepare_data(dequantized_config(), prepared) is prepared  # the report passes prepared data on
    with pytest.raises(DataError, match="not 8-bit levels"):
        prepare_data(dequantized_config(), tiny_data())
    trainer = Trainer(dequantized_config(epochs=1), tmp_path / "run", dataset=data, progress=False)
    batches = []
    terms = trainer.loss_terms

    def recording(model, xb, **kw):
        if model.training:  # the training batches, not the validation pass
            batches.append(xb.clone())
        return terms(model, xb, **kw)
    trainer.loss_terms = recording
    trainer.fit()
    levels = torch.floor(torch.cat(batches) * 256)
    assert levels.shape[0] == data.train.x.shape[0]  # every training image once, each in its 8-bit bin
    assert torch.equal(levels.sort(0).values, (data.train.x * 255).round().sort(0).values)
    assert not bool(((torch.cat(batches) * 255) - (torch.cat(batches) * 255).round()).abs().lt(1e-4).all())


def test_dynamic_binarisation_draws_new_pixels_for_every_batch(tmp_path):
    """Grey 0.5 everywhere: a batch's binary pixels are its noise alone, so batches drawn with the same noise
    (a generator seeded afresh per batch) would be the same picture."""
    grey = Dataset(name="tiny", train=Split(torch.full((64, 1, 6, 6), 0.5)), val=Split(torch.full((8, 1, 6, 6), 0.5)),
                   test=Split(torch.full((8, 1, 6, 6), 0.5)))
    trainer = Trainer(tiny_config(epochs=1), tmp_path / "run", dataset=grey, progress=False)  # batches of 16
    batches, terms = [], trainer.loss_terms

    def recording(model, xb, **kw):
        if model.training:
            batches.append(xb.clone())
        return terms(model, xb, **kw)
    trainer.loss_terms = recording
    trainer.fit()
    assert len(batches) == 4 and all(set(b.unique().tolist()) == {0.0, 1.0} for b in batches)
    assert len({tuple(b.flatten().tolist()) for b in batches}) == 4
    assert 0.4 < float(torch.cat(batches).mean()) < 0.6


def test_a_short_last_batch_steps_on_the_mean_of_its_own_examples(tmp_path, monkeypatch):
    """The loss is a per-example mean over the step's batch; scaled by --batch-size, a short tail's gradient shrank
    (a difference Adam mostly hides, --grad-clip does not)."""
    import copy
    import sys

    from vaelab.models import build_model

    train_module = sys.modules["vaelab.train"]  # (vaelab.train is also the function)

    config = dataclasses.replace(tiny_config(epochs=1, batch_size=16), model=ModelConfig(
        model="ae", likelihood="gaussian", hidden=(8,), latent_dim=2))  # deterministic: no sampling noise
    trainer = Trainer(config, tmp_path / "run", dataset=tiny_data(), progress=False)  # 67 images: a tail of 3
    seen, grads, terms, step = [], [], trainer.loss_terms, train_module.optimizer_step

    def recording(model, xb, **kw):
        if model.training:
            seen.append((copy.deepcopy(model.state_dict()), xb.clone()))
        return terms(model, xb, **kw)
    trainer.loss_terms = recording
    monkeypatch.setattr(train_module, "optimizer_step",
                        lambda opt: (grads.append([p.grad.clone() for p in trainer.parameters]), step(opt)))
    trainer.fit()
    state, xb = seen[-1]
    assert xb.shape[0] == 3
    model = build_model(trainer.config.model)
    model.load_state_dict(state)
    model.train()
    terms(model, xb, beta=1.0)["loss"].mean().backward()
    for got, p in zip(grads[-1], model.parameters()):
        torch.testing.assert_close(got, p.grad)


def test_the_report_of_a_run_that_stopped_early_says_so(tmp_path):
    """An interrupted run's report showed its last checkpoint (even the untrained epoch 0) as the run, beside
    baselines trained for all the epochs, without a word."""
    from vaelab.reports import write_report

    trainer = Trainer(tiny_config(epochs=3), tmp_path / "run", dataset=tiny_data(), progress=False)
    one_epoch = trainer._epoch

    def interrupted(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return one_epoch(epoch)
    trainer._epoch = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    page = write_report(tmp_path / "run", baselines=False, data=tiny_data()).read_text()
    assert (f"Training stopped after epoch 1 of 3: this report shows that checkpoint (baselines for the table train "
            f"for all 3). To continue it: vaelab train --resume --out {tmp_path / 'run'} (with a lower --lr X if it "
            f"stopped on a NaN or infinite loss, which the same rate would meet again)") in page
    train(tiny_config(epochs=1), tmp_path / "done", dataset=tiny_data(), progress=False)
    assert "Training stopped" not in write_report(tmp_path / "done", baselines=False, data=tiny_data()).read_text()


def test_an_untrained_run_says_so_in_its_report_and_on_the_command_line(tmp_path, capsys):
    """--epochs 0 saves the initial weights; the CLI said "trained vae" and the report showed them as a model."""
    from vaelab.cli import main
    from vaelab.reports import write_report

    run = tmp_path / "my run"  # the command must paste into a shell: it said --out .../my run
    assert main(["train", "--data", "digits", "--epochs", "0", "--hidden", "8", "--latent-dim", "2", "--quiet",
                 "--no-report", "--out", str(run)]) == 0
    assert capsys.readouterr().out == f"initialised vae on digits without training (--epochs 0): {run}\n"
    page = html.unescape(write_report(run, baselines=False).read_text())
    assert "This model is untrained (--epochs 0)" in page
    assert f"vaelab train --resume --epochs N --out '{run}'" in page
    assert main(["train", "--data", "digits", "--model", "pca", "--epochs", "0", "--latent-dim", "2", "--quiet",
                 "--no-report", "--out", str(tmp_path / "pca")]) == 0
    assert capsys.readouterr().out.startswith("trained pca on digits in ")
    assert "untrained" not in write_report(tmp_path / "pca", baselines=False).read_text()


def test_load_takes_the_checkpoint_a_caller_read_even_after_training_moves_on(tmp_path):
    """The explorer names the epoch it shows from the checkpoint it read; the weights must be that epoch's."""
    train(tiny_config(epochs=1), tmp_path / "run", dataset=tiny_data(), progress=False)
    first = runs.latest_checkpoint(tmp_path / "run")
    train(tiny_config(epochs=2), tmp_path / "run", resume=True, dataset=tiny_data(), progress=False)
    assert runs.latest_checkpoint(tmp_path / "run").epoch == 2
    pinned, latest = runs.load(tmp_path / "run", checkpoint=first), runs.load(tmp_path / "run")
    saved = load_file(first.path / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in pinned.state_dict().items())
    assert not all(torch.equal(v, latest.state_dict()[k]) for k, v in pinned.state_dict().items())


def test_python_api_refuses_mismatched_data_bad_devices_and_wrongly_typed_configs(tmp_path):
    """Each was a traceback from pathlib, torch or a dataclass, or (the data set) a run whose config.json named
    other data than it trained on, which evaluate and report then could not load."""
    config = tiny_config(epochs=1)
    with pytest.raises(ConfigError, match=r"data set given is 'digits' but the config's data is 'tiny'.*"
                                          r"DataConfig\(name='digits'\)"):
        train(config, tmp_path / "run", dataset=dataclasses.replace(tiny_data(), name="digits"), progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="run_dir .*file is a file; give a folder"):
        train(config, tmp_path / "file", dataset=tiny_data(), progress=False)
    train(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    for device, message in [("gpu", r"device 'gpu' is not one of auto, cpu, cuda or cuda:N \(cuda:0"),
                            ("", "is not one of"), (0, "is not one of"), ("mps", "is not one of"),
                            ("cuda:01", "is not one of"),
                            (torch.device("meta"), "device 'meta' is not a device vaelab runs on"),
                            ("cuda:256", r"device 'cuda:256': torch numbers GPUs cuda:0 to cuda:127")]:
        with pytest.raises(ConfigError, match=message):
            vaelab.load(tmp_path / "run", device=device)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device cuda:0 was asked for but torch sees no CUDA device"):
            vaelab.load(tmp_path / "run", device="cuda:0")
    assert vaelab.load(tmp_path / "run", device=torch.device("cpu")).training is False
    with pytest.raises(ConfigError, match=r"RunConfig's data must be a vaelab.config.DataConfig, got str"):
        RunConfig(data="digits")
    with pytest.raises(ConfigError, match=r"RunConfig's train must be .*TrainConfig, got NoneType"):
        RunConfig(train=None)
    for hidden in (16, "512,256"):
        with pytest.raises(ConfigError, match=r"--hidden must list layer widths, like \(512, 256\)"):
            ModelConfig(hidden=hidden)
    with pytest.raises(ConfigError, match="--hidden is empty; --net conv needs at least one channel count"):
        ModelConfig(net="conv", hidden=())
    with pytest.raises(ConfigError, match="--hidden is empty; --net conv"):
        ModelConfig(model="hvae", hidden=())  # was a message about --groups, never given
    assert ModelConfig(hidden=()).hidden == ()  # an MLP without hidden layers is a model


def test_python_api_trains_without_settings_the_model_would_ignore_and_says_so(tmp_path):
    """The CLI refuses flags a model would ignore; from Python a config shared by several models is natural, so
    train() resets them and warns. config.json recorded an AE's latent="vmf" and beta=4 as if they had acted."""
    config = RunConfig(data=DataConfig(name="tiny"), model=ModelConfig(model="ae", hidden=(16,), latent_dim=2,
                                                                       latent="vmf"),
                       train=TrainConfig(epochs=1, batch_size=16, beta=4.0))
    with pytest.warns(UserWarning, match=r"model.latent, train.beta would be ignored \(--model ae has a "
                                         r"deterministic code.*trained at their defaults, as config.json records"):
        train(config, tmp_path / "ae", dataset=tiny_data(), progress=False)
    stored = runs.load_config(tmp_path / "ae")
    assert stored.model.latent == "gaussian" and stored.train.beta == 1.0 and stored.model.hidden == (16,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say about a config the model uses whole
        train(dataclasses.replace(config, model=dataclasses.replace(config.model, model="vae")), tmp_path / "vae",
              dataset=tiny_data(), progress=False)
