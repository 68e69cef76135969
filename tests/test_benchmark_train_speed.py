"""benchmarks/train_speed.py: a failed measurement says why, a failing --compile leaves the default's numbers, and
the results name the machine."""
import json
import sys
from pathlib import Path

import pytest
import torch

from vaelab import linear as vlinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_speed  # noqa: E402

RATES = {"dataloader loop": 1000.0, "tight loop": 1500.0, "vaelab": 2500.0, "vaelab --compile": 3000.0,
         "matmul peak": 1e11}


def test_a_failed_measurement_names_the_method_and_its_error():
    """The process's traceback was captured and the run ended in 'returned non-zero exit status 1'."""
    with pytest.raises(train_speed.MeasurementFailed, match=r"^no such method: KeyError: 'no such method'$"):
        train_speed.measure_fresh("no such method", 10)


def _run_main(monkeypatch, tmp_path, failing: str, from_round: int) -> Path:
    calls = {"n": 0}

    def measure_fresh(method, examples):
        calls["n"] += 1
        if method == failing and calls["n"] > from_round * len(RATES):
            raise train_speed.MeasurementFailed(f"{method}: TrainingError: torch.compile could not compile")
        return RATES[method], 0.0
    monkeypatch.setattr(train_speed, "measure_fresh", measure_fresh)
    monkeypatch.setattr(train_speed, "flops_per_sample", lambda data: (6e6, 5e6))
    results = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--rounds", "3", "--examples", "256",
                                      "--results", str(results)])
    train_speed.main()
    return results


def test_a_failing_compile_is_dropped_and_the_default_numbers_still_come_out(monkeypatch, tmp_path, capsys):
    """It fails from round 2 on: round 1's compiled figure is dropped too, not mixed into the medians."""
    results = _run_main(monkeypatch, tmp_path, "vaelab --compile", from_round=1)
    out = capsys.readouterr().out.splitlines()
    assert "vaelab --compile: TrainingError: torch.compile could not compile; measuring without vaelab --compile" in out
    assert out[-1] == "speedup_vs_dataloader=2.50 fraction_of_limit=0.15"
    assert not any(line.startswith("with --compile") for line in out)
    saved = json.loads(results.read_text())
    assert all("vaelab --compile" not in row for row in saved["rounds"])
    # the machine the numbers come from is in the file and the header (stored runs of several machines sit side
    # by side, told apart only by their file names before)
    about = saved["machine"]
    assert about["capability"] == torch.backends.cpu.get_cpu_capability()
    assert about["threads"] == torch.get_num_threads()
    assert about["vaelab_linear"] == ("oneDNN" if vlinear.PREFER_ONEDNN else "default BLAS (MKL)")
    assert out[1].startswith("machine: ") and about["capability"] in out[1]
    assert set(saved["fraction_of_limit_by_method"]) == {"dataloader loop", "tight loop", "vaelab"}


def test_a_failing_required_method_ends_the_run_in_one_line(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"^train_speed: vaelab: TrainingError"):
        _run_main(monkeypatch, tmp_path, "vaelab", from_round=0)
