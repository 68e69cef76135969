"""benchmarks/matmul_backends.py: its layout comparison flips the memory order and keeps the values."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from matmul_backends import call_us, other_layout, products  # noqa: E402

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
