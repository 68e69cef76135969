"""A crash at any step of writing a checkpoint leaves latest.json pointing at a complete, loadable checkpoint.

test_train.py crashes the weights write once; here every file operation of runs.save_checkpoint fails in
turn (each os.replace, each file write, the pointer update), for a new epoch and for an epoch written again
(a PCA run refitted on --resume saves its epoch 1 a second time).
"""
import shutil

import pytest
import torch

from vaelab import runs
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import Dataset, Split
from vaelab.train import train

# what save_checkpoint calls, as attributes of the objects it reaches them through
STEPS = [(runs, "save_file"), (torch, "save"), (runs.os, "replace"), (runs, "atomic_write_text")]


class Crash(Exception):
    """The simulated power cut."""


def tiny_data() -> Dataset:
    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return Dataset(name="tiny", train=Split(x[:30]), val=Split(x[30:35]), test=Split(x[35:]))


@pytest.fixture
def run(tmp_path):
    config = RunConfig(data=DataConfig(name="tiny"), model=ModelConfig(hidden=(8,), latent_dim=2),
                       train=TrainConfig(epochs=1, batch_size=8))
    model = train(config, tmp_path / "run", dataset=tiny_data(), progress=False)
    return tmp_path / "run", model


def patch_steps(monkeypatch, on_call) -> None:
    """Route every call of STEPS through on_call(real, *args, **kwargs)."""
    for owner, name in STEPS:
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, **kw: on_call(_real, *a, **kw))


def save(run_dir, model, epoch) -> None:
    runs.save_checkpoint(run_dir, model=model, optimizer=torch.optim.Adam(model.parameters()), state={"epoch": epoch})


@pytest.mark.parametrize("epoch", [2, 1], ids=["new-epoch", "same-epoch-again"])
def test_a_crash_at_every_step_of_a_checkpoint_write_keeps_a_good_one(run, tmp_path, monkeypatch, epoch):
    run_dir, model = run
    pristine = tmp_path / "pristine"
    shutil.copytree(run_dir, pristine)
    old = runs.load(run_dir).state_dict()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the new checkpoint's weights differ from the old one's in every tensor
    new = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh_copy():
        shutil.rmtree(run_dir)
        shutil.copytree(pristine, run_dir)

    calls = []
    patch_steps(monkeypatch, lambda real, *a, **kw: calls.append(1) or real(*a, **kw))
    save(run_dir, model, epoch)  # an uninterrupted save, to count its steps
    monkeypatch.undo()
    assert len(calls) >= 5

    for k in range(1, len(calls) + 1):
        fresh_copy()
        count = [0]

        def crash_at_k(real, *a, _k=k, _count=count, **kw):
            _count[0] += 1
            if _count[0] == _k:
                raise Crash(f"power cut at step {_k}")
            return real(*a, **kw)

        patch_steps(monkeypatch, crash_at_k)
        with pytest.raises(Crash):
            save(run_dir, model, epoch)
        monkeypatch.undo()
        checkpoint = runs.latest_checkpoint(run_dir)  # never a pointer at a missing or half-written folder
        loaded = runs.load(run_dir).state_dict()
        assert all(torch.equal(loaded[n], old[n]) for n in old) or all(torch.equal(loaded[n], new[n]) for n in new)
        runs.load_optimizer(torch.optim.Adam(model.parameters()), checkpoint)
        assert not list((run_dir / runs.CHECKPOINTS).glob(".*.partial")), f"debris after a crash at step {k}"


def test_two_checkpoints_are_kept_by_epoch_number_and_killed_writes_are_cleared(run):
    """epoch-9999 sorted after epoch-10003 as text and was kept for good; a write killed outright (SIGKILL: no
    cleanup runs) left its .partial folder, a whole copy of weights and optimiser, through every later save."""
    run_dir, model = run
    root = run_dir / "checkpoints"
    (root / ".epoch-0002.abc123.partial").mkdir()
    (root / ".epoch-0002.abc123.partial" / "model.safetensors").write_bytes(b"half")
    (root / ".latest.json.xyz.tmp").write_text("{")
    for epoch in range(9998, 10004):
        save(run_dir, model, epoch)
        kept = sorted(p.name for p in root.iterdir())
        assert len([name for name in kept if name.startswith("epoch-")]) == 2
    assert kept == ["epoch-10002", "epoch-10003", "latest.json"]
    assert runs.latest_checkpoint(run_dir).epoch == 10003
