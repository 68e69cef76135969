"""kill -9 in the middle of an epoch, then --resume: the same weights, bit for bit, as a run never interrupted."""
import os
import signal
import subprocess
import sys
import time

import torch

from vaelab import runs
from vaelab.errors import CheckpointError

EPOCHS = 4
TRAIN = ["--data", "mnist5k", "--binarize", "dynamic", "--hidden", "128", "--latent-dim", "8", "--batch-size", "32",
         "--device", "cpu", "--seed", "3", "--no-report", "--quiet"]


def vaelab(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: CPU results are deterministic run to run
    return subprocess.Popen([sys.executable, "-m", "vaelab", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def last_epoch(run_dir) -> int:
    try:
        return runs.latest_checkpoint(run_dir).epoch
    except CheckpointError:
        return -1


def test_kill_9_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finish(vaelab(*TRAIN, "--epochs", str(EPOCHS), "--out", str(reference)))

    proc = vaelab(*TRAIN, "--epochs", str(EPOCHS), "--out", str(killed))
    deadline, seen = time.monotonic() + 300, {}
    while last_epoch(killed) < 2 and time.monotonic() < deadline and proc.poll() is None:
        seen.setdefault(last_epoch(killed), time.monotonic())
        time.sleep(0.01)
    seen.setdefault(last_epoch(killed), time.monotonic())
    assert proc.poll() is None, "the run ended before it could be killed"
    epoch_s = seen[2] - seen[1]
    time.sleep(0.4 * epoch_s)  # well inside epoch 3
    before = last_epoch(killed)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= last_epoch(killed) == before < EPOCHS  # killed mid-epoch, the last good checkpoint loads
    runs.load(killed)

    finish(vaelab(*TRAIN, "--epochs", str(EPOCHS), "--out", str(killed), "--resume"))
    a = runs.load(reference).state_dict()
    b = runs.load(killed).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    epochs = [r["epoch"] for r in runs.read_metrics(killed)]
    assert epochs == list(range(1, EPOCHS + 1))  # the killed epoch is trained once, logged once


def test_a_run_being_trained_is_not_trained_by_a_second_process(tmp_path):
    """A --resume started beside a live run pruned the live one's half-written checkpoint (its trainer died with a
    traceback), and both appended to metrics.jsonl (epochs 394, 395, 397, 396)."""
    out = tmp_path / "live"
    proc = vaelab("--data", "digits", "--hidden", "16", "--latent-dim", "2", "--epochs", "100000", "--quiet",
                  "--no-report", "--out", str(out))
    try:
        deadline = time.monotonic() + 120
        while last_epoch(out) < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        second = subprocess.run([sys.executable, "-m", "vaelab", "train", "--resume", "--out", str(out), "--epochs",
                                 "100000", "--quiet", "--no-report"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"{out} is being trained by another process (PID {proc.pid}); let it finish" in second.stderr
        assert proc.poll() is None  # the first goes on
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    third = subprocess.run([sys.executable, "-m", "vaelab", "train", "--resume", "--out", str(out), "--epochs",
                            str(last_epoch(out) + 1), "--quiet", "--no-report"], capture_output=True, text=True,
                           timeout=120)  # the lock went with the process that held it
    assert third.returncode == 0, third.stderr
