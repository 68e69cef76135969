"""torchrun: two gloo processes on the CPU match one process over the same global batches, resume, fail loudly."""
import copy
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vaelab import distributed, runs
from vaelab.cli import build_parser, main
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.errors import ConfigError
from vaelab.flags import PRESETS, config_from_args
from vaelab.models import VAE, build_model
from vaelab.train import train

COMMON = ["--model", "ae", "--likelihood", "gaussian", "--hidden", "16", "--latent-dim", "3", "--lr", "0.01",
          "--seed", "3", "--device", "cpu", "--no-report", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (200, 6, 6), dtype=np.uint8))  # 160 train examples
    return f"npz:{path}"


def torchrun(nproc: int, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vaelab", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def first_epoch(data, tmp_path_factory):
    """A run of COMMON's AE trained for one epoch by two processes at batch 16: three tests start from it (each
    from its own copy, made by copy_run), one torchrun job instead of three."""
    out = tmp_path_factory.mktemp("first") / "run"
    first = torchrun(2, "--data", data, *COMMON, "--batch-size", "16", "--epochs", "1", "--out", str(out))
    assert first.returncode == 0, first.stderr
    return out


def copy_run(run, to):
    shutil.copytree(run, to)
    return to


def weights(run):
    return load_file(runs.latest_checkpoint(run).path / "model.safetensors")


@pytest.mark.parametrize("n", [200, 201], ids=["whole-batches", "tail-of-one"])
def test_two_processes_match_one_over_the_same_global_batches(data, tmp_path, n):
    # one process with batch 32 sees the same global batches as two processes with batch 16 each; 161 training
    # examples end in a tail of one, which one process trained on and two skipped (their weights drifted apart)
    if n != 200:
        path = tmp_path / "odd.npz"
        np.savez(path, x=np.random.default_rng(0).integers(0, 256, (n, 6, 6), dtype=np.uint8))
        data = f"npz:{path}"
    one = torchrun(1, "--data", data, *COMMON, "--batch-size", "32", "--epochs", "3", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "--data", data, *COMMON, "--batch-size", "16", "--epochs", "3", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in b)  # unwrapped on disk
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    m1, m2 = runs.read_metrics(tmp_path / "one"), runs.read_metrics(tmp_path / "two")
    assert len(m2) == 3  # only rank 0 wrote: one line per epoch
    for r1, r2 in zip(m1, m2):  # metrics are all-reduced, so they cover all the data
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-4)
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=1e-4)


def test_a_distributed_run_resumes(data, first_epoch, tmp_path):
    out = str(copy_run(first_epoch, tmp_path / "run"))
    # on one process it went on with half the global batch, silently
    one = subprocess.run([sys.executable, "-m", "vaelab", "train", "--resume", "--out", out, "--epochs", "3",
                          "--no-report", "--quiet"], capture_output=True, text=True, check=False)
    assert one.returncode == 2 and "was trained on 2 process(es), this job has 1" in one.stderr, one.stderr
    assert runs.latest_checkpoint(tmp_path / "run").epoch == 1
    again = torchrun(2, "--resume", "--out", out, "--epochs", "3", "--device", "cpu", "--no-report", "--quiet")
    assert again.returncode == 0, again.stderr
    full = torchrun(2, "--data", data, *COMMON, "--batch-size", "16", "--epochs", "3", "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "run")] == [1, 2, 3]
    a, b = weights(tmp_path / "run"), weights(tmp_path / "full")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 3


def test_a_run_rank_0_refuses_is_refused_by_every_process_in_one_line(data, first_epoch, tmp_path):
    # rank 0 alone holds the run's lock and checks a new --out; the other process went on into the run and printed
    # the traceback of a collective whose peer had gone ("Connection closed by peer")
    out = copy_run(first_epoch, tmp_path / "run")
    fd = os.open(out / runs.LOCK, os.O_RDWR)  # a live trainer
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, b"4242")
    beside = torchrun(2, "--resume", "--out", str(out), "--epochs", "2", "--device", "cpu", "--no-report", "--quiet")
    os.close(fd)
    again = torchrun(2, "--data", data, *COMMON, "--batch-size", "16", "--epochs", "1", "--out", str(out))
    for done, refusal in ((beside, "is being trained by another process (PID 4242)"),
                          (again, "already holds a run; pass --resume")):
        assert done.returncode != 0
        assert refusal in done.stderr and "rank 0 of this torchrun job could not start the run" in done.stderr
        assert "[rank1]: Traceback" not in done.stderr and "Connection closed" not in done.stderr, done.stderr
    assert [r["epoch"] for r in runs.read_metrics(out)] == [1]


def test_a_checkpoint_rank_0_cannot_write_stops_every_process_in_one_line(data, tmp_path):
    # rank 0 alone writes checkpoints; the other process waited at a barrier and printed a collective's traceback
    script = tmp_path / "full_disk.py"
    script.write_text("import sys\nfrom vaelab import cli, runs\nfrom vaelab.errors import CheckpointError\n"
                      "save = runs.save_checkpoint\n"
                      "def full(run_dir, *, state, **kw):\n"
                      "    if state['epoch'] == 2:\n"
                      "        raise CheckpointError('no space left on the device (a test)')\n"
                      "    return save(run_dir, state=state, **kw)\n"
                      "runs.save_checkpoint = full\nsys.exit(cli.main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "train",
           "--data", data, *COMMON, "--batch-size", "16", "--epochs", "3", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "no space left on the device (a test)" in done.stderr
    assert "rank 0 of this torchrun job could not save the run" in done.stderr
    assert "[rank1]: Traceback" not in done.stderr and "Connection closed" not in done.stderr, done.stderr
    assert runs.latest_checkpoint(tmp_path / "run").epoch == 1


def test_run_files_rank_0_cannot_write_at_start_or_resume_stop_every_process_in_one_line(data, first_epoch, tmp_path):
    """Rank 0 wrote config.json (a new run) and metrics.jsonl (a resume) outside the work the other processes wait
    on: a full disk there left them waiting for a peer that had gone, then printing a collective's traceback."""
    script = tmp_path / "full_disk.py"
    script.write_text("import os, sys\nfrom vaelab import cli, config, runs\n"
                      "def full(write):\n"
                      "    def refuse(path, text):\n"
                      "        if path.name == os.environ['FULL']:\n"
                      "            raise OSError(28, 'No space left on device', str(path))\n"
                      "        return write(path, text)\n"
                      "    return refuse\n"
                      "config.atomic_write_text = full(config.atomic_write_text)\n"
                      "runs.atomic_write_text = full(runs.atomic_write_text)\n"
                      "sys.exit(cli.main(sys.argv[1:]))\n")
    out = str(copy_run(first_epoch, tmp_path / "run"))
    for full, args, what in (
            ("config.json", ["--data", data, *COMMON, "--epochs", "1", "--out", str(tmp_path / "new")],
             "write config.json"),
            ("metrics.jsonl", ["--resume", "--out", out, "--epochs", "2", "--device", "cpu", "--no-report", "--quiet"],
             "resume the run")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "train", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "FULL": full})
        assert done.returncode != 0
        assert f"could not {what}: No space left on device" in done.stderr, done.stderr
        assert f"rank 0 of this torchrun job could not {what}" in done.stderr
        assert "[rank1]: Traceback" not in done.stderr and "Connection closed" not in done.stderr, done.stderr
    assert runs.latest_checkpoint(tmp_path / "run").epoch == 1


@pytest.mark.parametrize("compiled", [(), ("eager",)], ids=["eager", "traced by dynamo"])
def test_batch_norm_statistics_cover_the_global_batch(tmp_path, compiled):
    """Two processes on uneven halves of each batch train BatchNorm1d/2d layers (affine or not, momentum or
    cumulative) as one process does on whole batches: outputs, weights and running statistics
    (tests/sync_bn_worker.py; with DDP's plain batch norm they differ by 0.1-3). Also through torch.compile's
    tracer, which must keep the exchanges (checked by hand with inductor too)."""
    out = tmp_path / "diffs.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("sync_bn_worker.py")), str(out), *compiled]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    diffs = json.loads(out.read_text())
    assert diffs["kinds"] == ["JobBatchNorm"]
    assert diffs["outputs"] < 1e-4 and max(diffs["state"].values()) < 1e-5, diffs


def test_synchronised_batch_norm_keeps_the_layers_state_and_is_plain_batch_norm_outside_a_job():
    torch.manual_seed(0)
    hvae = build_model(ModelConfig(input_shape=(1, 28, 28), **PRESETS["hvae-s"]["model"]))
    for model, x in ((VAE(input_shape=(1, 6, 6), latent_dim=3, hidden=(16,), bn_mu=0.5), torch.rand(8, 1, 6, 6)),
                     (hvae, torch.rand(4, 1, 28, 28))):
        before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        original = copy.deepcopy(model)
        distributed.synchronise_batch_norm(model, torch.device("cpu"), group="unused here")
        layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert layers and all(type(m) is distributed.JobBatchNorm for m in layers)
        after = model.state_dict(keep_vars=True)
        assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # shared, not copied
        for mode in ("train", "eval"):  # without a process group: BatchNorm's own computation
            getattr(model, mode)(), getattr(original, mode)()
            torch.manual_seed(1)
            a = model.encode(x).mean
            torch.manual_seed(1)
            torch.testing.assert_close(a, original.encode(x).mean, rtol=0, atol=0)
        torch.testing.assert_close(model.state_dict(), original.state_dict(), rtol=0, atol=0)


def test_no_sync_bn_leaves_each_process_its_own_statistics(monkeypatch):
    assert config_from_args(build_parser().parse_args(["train"])).train.sync_bn
    assert not config_from_args(build_parser().parse_args(["train", "--no-sync-bn"])).train.sync_bn
    monkeypatch.setattr(distributed, "DistributedDataParallel", lambda model, **kw: model)  # no process group here
    monkeypatch.setattr(distributed.tdist, "new_group", lambda **kw: None)
    for sync, kind in ((True, distributed.JobBatchNorm), (False, torch.nn.BatchNorm1d)):
        model = VAE(input_shape=(1, 6, 6), latent_dim=3, hidden=(16,), bn_mu=0.5)
        distributed.Job(world=2).wrap(model, torch.device("cpu"), sync_bn=sync)
        assert type(model.posterior.mean_bn) is kind


def test_a_bn_vae_trains_in_two_processes_and_saves_plain_batch_norm(data, tmp_path):
    vae = ["--model", "vae", "--bn-mu", "0.5", "--hidden", "16", "--latent-dim", "3", "--seed", "3",
           "--device", "cpu", "--no-report", "--quiet", "--batch-size", "16", "--epochs", "1"]
    two = torchrun(2, "--data", data, *vae, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    one = torchrun(1, "--data", data, *vae, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    assert weights(tmp_path / "two").keys() == weights(tmp_path / "one").keys()
    model = runs.load(tmp_path / "two")
    assert type(model.posterior.mean_bn) is torch.nn.BatchNorm1d and model.posterior.mean_bn.num_batches_tracked == 5


def test_a_training_split_smaller_than_the_job_trains(tmp_path):
    """One training example and two processes: the process without it steps on it weighted 0, and its progress
    bar divided by its 0 examples (ZeroDivisionError in rank 1)."""
    path = tmp_path / "three.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (3, 6, 6), dtype=np.uint8))
    done = torchrun(2, "--data", f"npz:{path}", *COMMON, "--epochs", "2", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "run")] == [1, 2]


def test_a_failing_rank_fails_the_job_with_its_error(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # rank 0 refuses to overwrite another tool's config.json
    done = torchrun(2, "--data", data, *COMMON, "--epochs", "1", "--out", str(out), timeout=120)
    assert done.returncode != 0
    assert "vaelab: error (rank 0)" in done.stderr and "holds a config.json that is not a vaelab run's" in done.stderr


def test_leaving_a_job_waits_without_the_gil_after_destroying_the_group(monkeypatch):
    # gloo's worker threads may still need the GIL to release DDP's last all-reduce works; a process that starts
    # to shut down before they have it aborts (distributed.EXIT_GRACE_S); time.sleep releases the GIL
    calls = []
    monkeypatch.setattr(distributed.tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.tdist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.tdist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed.time, "sleep", lambda s: calls.append(("sleep", s)))
    distributed.leave(distributed.Job(world=2, rank=1))
    assert calls == ["barrier", "destroy", ("sleep", distributed.EXIT_GRACE_S)]
    assert distributed.EXIT_GRACE_S >= 0.05  # the wait measured to suffice (README)
    calls.clear()
    distributed.leave(distributed.Job())  # a job of one process has no group to leave
    assert calls == []


def test_a_job_with_its_report_trains_the_baselines_in_rank_0_alone(data, tmp_path):
    """After the job, rank 0 writes the report and trains the AE/VAE baselines for it; those trainers joined a
    process group of two again, waiting for ever for a rank that had exited."""
    out = tmp_path / "run"
    args = [a for a in COMMON if a not in ("--no-report", "--model", "ae")]
    two = torchrun(2, "--data", data, *args, "--model", "vae", "--epochs", "1", "--out", str(out), timeout=240)
    assert two.returncode == 0, two.stderr
    assert "report:" in two.stdout and (out / "report.html").exists()
    for name in ("pca", "ae"):
        assert runs.is_complete(out / "baselines" / name)


def test_one_named_gpu_is_refused_under_torchrun(monkeypatch):
    """--device cuda:1 in a job would put every process on one GPU; each takes cuda:LOCAL_RANK with --device cuda."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"--device cuda:1 names one GPU, but under torchrun each process takes its "
                                          r"own \(cuda:LOCAL_RANK\); pass --device cuda"):
        distributed.join("cuda:1")
    assert not torch.distributed.is_initialized()


def test_world_size_without_torchrun_is_one_line(monkeypatch):
    """WORLD_SIZE=2 set by hand, without torchrun's MASTER_ADDR and MASTER_PORT: torch's ValueError was a traceback."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE is 2 but MASTER_ADDR and MASTER_PORT are not set: start a job "
                                          r"of several processes with torchrun"):
        distributed.join("cpu")
    assert not torch.distributed.is_initialized()


def test_the_python_api_refuses_a_job_before_loading_data(tmp_path, monkeypatch):
    """vaelab.train(config) under WORLD_SIZE=2 without MASTER_ADDR/PORT loaded the data first (a download, or the
    full Fashion-MNIST) and refused after; the CLI checked early, the Trainer did not."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    config = RunConfig(data=DataConfig(name=f"npz:{tmp_path / 'missing.npz'}"),  # loading it would fail
                       model=ModelConfig(model="vae", hidden=(16,), latent_dim=2), train=TrainConfig(device="cpu"))
    with pytest.raises(ConfigError, match=r"WORLD_SIZE is 2 but MASTER_ADDR and MASTER_PORT are not set"):
        train(config, tmp_path / "run", progress=False)
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_python_api_refuses_a_missing_gpu_before_loading_data(tmp_path):
    config = RunConfig(data=DataConfig(name=f"npz:{tmp_path / 'missing.npz'}"),
                       model=ModelConfig(model="vae", hidden=(16,), latent_dim=2), train=TrainConfig(device="cuda"))
    with pytest.raises(ConfigError, match=r"^TrainConfig.device cuda was asked for but torch sees no CUDA device"):
        train(config, tmp_path / "run", progress=False)  # (in the --device flag's words before)


def test_the_python_api_names_the_config_field_when_it_refuses_one_named_gpu_in_a_job(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    config = RunConfig(data=DataConfig(name=f"npz:{tmp_path / 'missing.npz'}"),
                       model=ModelConfig(model="vae", hidden=(16,), latent_dim=2), train=TrainConfig(device="cuda:1"))
    with pytest.raises(ConfigError, match=r"^TrainConfig.device cuda:1 names one GPU, but under torchrun each process "
                                          r"takes its own \(cuda:LOCAL_RANK\); use TrainConfig\(device='cuda'\)"):
        train(config, tmp_path / "run", progress=False)
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resuming_a_gpu_run_on_a_machine_without_one_names_its_config(tmp_path, capsys):
    """The refusal said "--device cuda was asked for" to a user who had passed no --device: the run's config.json
    asked for it."""
    run = tmp_path / "gpu"
    argv = ["train", "--data", "digits", "--hidden", "8", "--latent-dim", "2", "--epochs", "1", "--quiet",
            "--no-report", "--out", str(run)]
    assert main([*argv, "--device", "cpu"]) == 0
    stored = json.loads((run / "config.json").read_text())
    stored["train"]["device"] = "cuda"  # as trained on a GPU
    (run / "config.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert main([*argv, "--resume", "--epochs", "2"]) == 2
    assert f"{run}/config.json's device cuda was asked for but torch sees no CUDA device" in capsys.readouterr().err
    assert main([*argv, "--resume", "--epochs", "2", "--device", "cpu"]) == 0  # the fix: another device


def test_a_torchrun_job_refuses_one_named_gpu_before_loading_data(tmp_path, capsys, monkeypatch):
    """vaelab train refused --device cuda:1 under torchrun only once the data had loaded (the full Fashion-MNIST: a
    wait, then the error); a resumed run whose config.json names cuda:1 was refused as if --device had said so."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    missing = f"npz:{tmp_path / 'missing.npz'}"  # loading it would fail: the device must be refused first
    assert main(["train", "--data", missing, "--device", "cuda:1", "--out", str(tmp_path / "r")]) == 2
    assert "--device cuda:1 names one GPU, but under torchrun" in capsys.readouterr().err
    run = tmp_path / "gpu1"
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = ["train", "--data", "digits", "--hidden", "8", "--latent-dim", "2", "--epochs", "1", "--quiet",
            "--no-report", "--out", str(run)]
    assert main([*argv, "--device", "cpu"]) == 0
    stored = json.loads((run / "config.json").read_text())
    stored["train"]["device"] = "cuda:1"  # as trained on a second GPU
    (run / "config.json").write_text(json.dumps(stored))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--resume", "--epochs", "2"]) == 2
    assert f"{run}/config.json's device cuda:1 names one GPU" in capsys.readouterr().err


def test_single_process_makes_a_job_of_one_whatever_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with distributed.single_process():
        job, device = distributed.join("cpu")
    assert job == distributed.Job() and device == torch.device("cpu")
