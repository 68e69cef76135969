"""Checkpoints under attack and damage: code never runs, every damaged file gives one clear line.

(tests/test_train.py covers an interrupted write, a truncated weights file, a damaged optimizer.pt or
latest.json and a malicious optimizer pickle; here: a pickle as the weights file, random damage to every
file of a checkpoint, and the same faults through the command line.)
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaelab import runs
from vaelab.cli import main
from vaelab.errors import VaelabError

FILES = ["model.safetensors", "optimizer.pt", "trainer.json"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    np.savez(root / "bars.npz", x=np.random.default_rng(0).random((120, 6, 6)).astype("float32"))
    out = root / "run"
    result = subprocess.run([sys.executable, "-m", "vaelab", "train", "--data", f"npz:{root / 'bars.npz'}",
                             "--hidden", "16", "--latent-dim", "2", "--epochs", "2", "--batch-size", "16",
                             "--no-report", "--quiet", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def copy_of(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run, runs.latest_checkpoint(run).path


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_a_malicious_pickle_in_place_of_a_checkpoint_file_never_runs(good_run, tmp_path, name):
    run, path = copy_of(good_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"weights": Evil(marker)}, path / name)
    result = subprocess.run([sys.executable, "-m", "vaelab", "train", "--out", str(run), "--resume", "--epochs", "3",
                             "--no-report", "--quiet"], capture_output=True, text=True)
    assert result.returncode != 0 and not marker.exists()
    assert "Traceback" not in result.stderr and name in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_checkpoint_files_give_one_line_on_the_command_line(good_run, tmp_path, capsys, name, damage):
    run, path = copy_of(good_run, tmp_path)
    data = (path / name).read_bytes()
    if damage == "delete":
        (path / name).unlink()
    else:
        (path / name).write_bytes(data[: len(data) // 3] if damage == "truncate" else b"")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-report", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert name in err or "checkpoint" in err


@pytest.mark.parametrize("damage", ["delete", "truncate", "not an object"])
def test_a_damaged_trainer_json_is_named_in_the_error(good_run, tmp_path, capsys, damage):
    """The test above passes on any line with "checkpoint" in it: an error naming model.safetensors, or no file,
    for a damaged trainer.json sent the user to the wrong file."""
    run, path = copy_of(good_run, tmp_path)
    state = path / "trainer.json"
    if damage == "delete":
        state.unlink()
    else:
        state.write_text(state.read_text()[:10] if damage == "truncate" else "[]")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-report", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"vaelab: error: {state} is "), err
    assert "model.safetensors" not in err and "optimizer.pt" not in err, err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES + ["latest.json"]), where=st.floats(0, 1), byte=st.integers(0, 255))
def test_any_flipped_byte_loads_or_is_refused_clearly(good_run, tmp_path_factory, name, where, byte):
    run, path = copy_of(good_run, tmp_path_factory.mktemp("flip"))
    file = run / runs.CHECKPOINTS / name if name == "latest.json" else path / name
    data = bytearray(file.read_bytes())
    data[min(int(where * len(data)), len(data) - 1)] = byte
    file.write_bytes(bytes(data))
    try:
        model = runs.load(run)
        optimizer = torch.optim.Adam(model.parameters())
        runs.load_optimizer(optimizer, runs.latest_checkpoint(run))
    except VaelabError as e:
        assert "\n" not in str(e).strip()
