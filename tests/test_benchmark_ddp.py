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
