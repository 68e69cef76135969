"""benchmarks/ddp_scaling.py --batch-norm: the all-reduce latency it prices synchronised batch norm with."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ddp_scaling import all_reduce_latency  # noqa: E402


def test_all_reduce_latency_is_per_exchange_between_two_processes(tmp_path):
    start = time.perf_counter()
    few = all_reduce_latency(tmp_path / "a", repeats=20)
    whole = time.perf_counter() - start
    many = all_reduce_latency(tmp_path / "b", repeats=200)
    # seconds per all-reduce, not per call of the function (which spawns two processes: a second or more);
    # ten times the repeats must not make it ten times larger
    assert 0 < few < whole / 20 and 0 < many < 0.05
    assert many < 5 * few + 1e-3


def test_job_trains_an_hvae_in_two_processes_and_reads_its_throughput(tmp_path):
    """The --batch-norm comparison's job path (torchrun, 2 processes, synchronised batch norm), on a small
    HVAE in place of the hvae-s preset."""
    from ddp_scaling import job, npz_data

    from vaelab import runs

    data = npz_data(tmp_path, 64)
    hvae = ["--model", "hvae", "--net", "conv", "--hidden", "8,12", "--groups", "1,2", "--latent-dim", "3",
            "--epochs", "1", "--batch-size", "16"]
    speed = job(2, data, tmp_path / "run", hvae)
    assert speed > 0 and runs.is_complete(tmp_path / "run")
    config = runs.load_config(tmp_path / "run")
    assert config.model.model == "hvae" and config.train.sync_bn
