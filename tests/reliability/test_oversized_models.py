"""A model too large to allocate, asked for by flags or by an edited config.json, is one line, not a traceback."""
import json
import shutil

import numpy as np
import pytest

from vaelab import runs
from vaelab.cli import main
from vaelab.errors import CheckpointError

HUGE = 10**11  # 10**11 x 64 float32 weights = 25.6 TB: the allocator refuses at once, nothing is touched


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("oversized")
    np.savez(root / "x.npz", x=np.random.default_rng(0).random((40, 4, 4)).astype("float32"))
    out = root / "run"
    assert main(["train", "--data", f"npz:{root / 'x.npz'}", "--hidden", "8", "--latent-dim", "2", "--epochs", "1",
                 "--batch-size", "8", "--no-report", "--quiet", "--out", str(out)]) == 0
    return root, out


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_flags_asking_for_a_model_too_large_to_allocate(small_run, tmp_path, capsys):
    root, _ = small_run
    capsys.readouterr()
    code = main(["train", "--data", f"npz:{root / 'x.npz'}", "--hidden", str(HUGE), "--epochs", "1",
                 "--no-report", "--quiet", "--out", str(tmp_path / "huge")])
    assert code == 2
    assert "needs more memory than there is; choose smaller --hidden" in one_line(capsys)


@pytest.mark.parametrize("edit", ["huge", "no-shape"])
def test_a_config_json_edited_to_an_unbuildable_model(small_run, tmp_path, capsys, edit):
    run = tmp_path / "run"
    shutil.copytree(small_run[1], run)
    raw = json.loads((run / "config.json").read_text())
    if edit == "huge":
        raw["model"]["hidden"] = [HUGE]
    else:
        raw["model"]["input_shape"] = None
    (run / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json describes no model vaelab can build"):
        runs.load(run)
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 2
    assert "config.json describes no model" in one_line(capsys)
