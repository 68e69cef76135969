"""benchmarks/matmul_backends.py: its layout comparison flips the memory order and keeps the values."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from matmul_backends import call_us, dispatch, other_layout, products  # noqa: E402

from vaelab import linear  # noqa: E402


@pytest.mark.parametrize("name,a,b", products(batch=4)[:3], ids=lambda v: v if isinstance(v, str) else "")
def test_other_layout_has_the_same_values_in_the_other_memory_order(name, a, b):
    flipped = other_layout(b)
    assert torch.equal(flipped, b) and flipped.is_contiguous() != b.is_contiguous()
    assert flipped.t().is_contiguous() != b.t().is_contiguous()


def test_call_us_times_forward_and_backward():
    layer = linear.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    assert call_us(layer, x, calls=3) > 0 and x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("prefer_onednn", [False, True])
def test_dispatch_times_each_path_of_this_cpu_and_restores_the_preference(monkeypatch, capsys, prefer_onednn):
    monkeypatch.setattr(linear, "PREFER_ONEDNN", prefer_onednn)
    dispatch(rounds=1, calls=(3, 3))  # the table's rows, not their times (calls=(200, 2000): 10-35 s)
    rows = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("Sequential")]
    names = ["nn.Sequential", "vaelab, general path"] + ([] if prefer_onednn else ["vaelab, fast path"])
    assert [row[:42].strip() for row in rows] == names  # the fast path is only for CPUs where MKL wins
    assert all(float(t) > 0 for row in rows for t in row[42:].split())
    assert linear.PREFER_ONEDNN is prefer_onednn

