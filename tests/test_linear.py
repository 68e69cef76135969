"""vaelab.linear: fully connected layers through oneDNN agree with F.linear, forward and backward."""
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab import linear as vlinear
from vaelab.linear import MIN_MACS, Linear, Sequential, linear, matmul_nt, onednn_off

DEFAULT_PREFER_ONEDNN = vlinear.PREFER_ONEDNN  # before the fixture below changes it
onednn = pytest.mark.skipif(vlinear._LINEAR is None or not torch.backends.mkldnn.is_available(),
                            reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def prefer_onednn(monkeypatch):
    """The oneDNN path on every CPU, as on AMD CPUs with AVX-512: elsewhere layers take it only when asked."""
    monkeypatch.setattr(vlinear, "PREFER_ONEDNN", True)


def _both(shape: tuple[int, ...], n_out: int, *, input_grad: bool = True):
    """Outputs and gradients of vaelab's Linear and nn.Linear with the same weights on the same input."""
    torch.manual_seed(0)
    ours = Linear(shape[-1], n_out)
    ref = nn.Linear(shape[-1], n_out)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(*shape)
    results = []
    for layer in (ours, ref):
        xi = x.clone().requires_grad_(input_grad)
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
    return results


@onednn
@pytest.mark.parametrize("shape", [(128, 784), (4, 40, 512)])
def test_values_and_gradients_match_f_linear(shape):
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = _both(shape, 512)
    assert y.grad_fn.name() == "_OneDNNChainBackward"  # large enough to take the oneDNN path
    assert y.shape == y_ref.shape and gx.shape == gx_ref.shape
    for ours, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)  # float32, another summation order


@onednn
def test_data_input_needs_no_gradient():
    (y, gx, gw, _), (_, _, gw_ref, _) = _both((128, 784), 512, input_grad=False)
    assert y.grad_fn.name() == "_OneDNNChainBackward" and gx is None
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-4)


def test_small_layers_other_dtypes_and_disabled_onednn_use_f_linear():
    small = torch.randn(8, 16, requires_grad=True)
    assert 8 * 16 * 256 < MIN_MACS
    assert linear(small, torch.randn(256, 16), torch.zeros(256)).grad_fn.name() == "AddmmBackward0"
    x64 = torch.randn(128, 784, dtype=torch.float64, requires_grad=True)
    assert linear(x64, torch.randn(512, 784, dtype=torch.float64)).grad_fn.name() == "MmBackward0"
    x = torch.randn(128, 784, requires_grad=True)
    with onednn_off():
        assert linear(x, torch.randn(512, 784), torch.zeros(512)).grad_fn.name() == "AddmmBackward0"


def test_linear_is_nn_linear_on_disk():
    """Same parameters, names and initialisation as nn.Linear: checkpoints move between the two."""
    torch.manual_seed(3)
    ours = Linear(784, 512)
    torch.manual_seed(3)
    ref = nn.Linear(784, 512)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))


def test_matmul_nt_is_a_times_b_transposed_for_any_strides():
    """Transposed operands (as a layer's backward passes them) and a sliced, padded b."""
    torch.manual_seed(0)
    a, b, c = torch.randn(300, 200), torch.randn(100, 300), torch.randn(300, 100)
    torch.testing.assert_close(matmul_nt(a.t(), c.t()), a.t() @ c, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(matmul_nt(a, b[:, :200], torch.ones(100)), F.linear(a, b[:, :200], torch.ones(100)),
                               rtol=1e-5, atol=1e-4)


@onednn
def test_fused_relu_matches_linear_then_relu():
    torch.manual_seed(0)
    x = torch.randn(128, 512, requires_grad=True)
    w, b = torch.randn(256, 512, requires_grad=True), torch.randn(256, requires_grad=True)
    y = linear(x, w, b, relu=True)
    assert y.grad_fn.name() == "_OneDNNChainBackward" and (y == 0).any() and (y > 0).any()
    y_ref = F.relu(F.linear(x, w, b))
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, w, b), grad)
    ref = torch.autograd.grad(y_ref, (x, w, b), grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


def test_sequential_fuses_without_changing_modules_or_keys():
    """vaelab's Sequential has nn.Sequential's modules and keys, and the same outputs (fused or not)."""
    torch.manual_seed(0)
    layers = [Linear(784, 512), nn.ReLU(), Linear(512, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU()]
    ours, ref = Sequential(*layers), nn.Sequential(*layers)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(128, 784)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-4)


@onednn
def test_double_backward_raises():
    x = torch.randn(128, 784, requires_grad=True)
    y = Linear(784, 512)(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiable"):
        gx.sum().backward()


@onednn
def test_sequential_chain_matches_nn_sequential_values_and_gradients():
    """A stretch of oneDNN layers (ReLU after some, one without bias, one frozen) is one autograd node
    with nn.Sequential's values and gradients; a small layer in between runs on its own."""
    torch.manual_seed(0)
    layers = [Linear(784, 512), nn.ReLU(), Linear(512, 256, bias=False), nn.ReLU(), Linear(256, 512),
              Linear(512, 8), nn.ReLU(), Linear(8, 512), nn.ReLU(), Linear(512, 784)]
    layers[4].weight.requires_grad_(False)
    ours, ref = Sequential(*layers), nn.Sequential(*layers)
    x = torch.randn(128, 784, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    first = ours[:5](x).grad_fn  # the first three layers: one node, fed by x and the parameters directly
    assert first.name() == "_OneDNNChainBackward"
    assert not any(f is not None and f.name() == "_OneDNNChainBackward" for f, _ in first.next_functions)
    assert y.grad_fn.name() == "_OneDNNChainBackward"  # Linear(512, 784) after the small layers
    params = [x] + [p for p in ours.parameters() if p.requires_grad]
    grad = torch.randn_like(y)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    for a, r in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(y_ref, params, grad)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-4)


@onednn
def test_shape_mismatch_gives_torchs_error_naming_both_shapes():
    """oneDNN's own error names no shapes; a layer that does not fit its input goes to F.linear, whose does."""
    with pytest.raises(RuntimeError, match=r"128x780 and 784x512"):
        Linear(784, 512)(torch.randn(128, 780))
    chain = Sequential(Linear(784, 512), nn.ReLU(), Linear(500, 784))  # misbuilt: 512 outputs into 500 inputs
    with pytest.raises(RuntimeError, match=r"128x512 and 500x784"):
        chain(torch.randn(128, 784))


def test_intel_cpus_keep_nn_linear(monkeypatch):
    """Where MKL takes its fastest path (Intel), every layer is plain F.linear, chains included."""
    monkeypatch.setattr(vlinear, "PREFER_ONEDNN", False)
    x = torch.randn(128, 784, requires_grad=True)
    assert Linear(784, 512)(x).grad_fn.name() == "AddmmBackward0"
    assert Sequential(Linear(784, 512), nn.ReLU())(x).grad_fn.name() == "ReluBackward0"


def test_cpu_vendor_and_avx512_decide_the_default():
    """Read off /proc/cpuinfo here, not through system.cpu_info and torch's capability: oneDNN by default on an x86
    CPU not made by Intel whose flags have AVX-512 (the F, BW, VL and DQ parts torch's AVX512 kernels need)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's vendor and flags from")
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("ATEN_CPU_CAPABILITY overrides what torch makes of the CPU's flags")
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    if vendor is None or flags is None:
        pytest.skip("/proc/cpuinfo names no x86 vendor or flags (not an x86 CPU)")
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags.group(1).split())
    assert DEFAULT_PREFER_ONEDNN == (vendor.group(1) != "GenuineIntel" and avx512)


@pytest.mark.parametrize(("vendor", "capability", "expected"), [
    ("AuthenticAMD", "AVX512", True),  # Zen 4/5: MKL would take its AVX2 path, oneDNN its AVX-512 one
    ("AuthenticAMD", "AVX2", False),  # Zen 3: both run AVX2, MKL's kernels are the faster
    ("GenuineIntel", "AVX512", False),  # MKL's own AVX-512 path
    ("GenuineIntel", "AVX2", False),
    ("", "DEFAULT", False),  # not x86 (or unreadable): torch's default, nothing measured
    ("", "AVX512", False),
])
def test_onednn_only_where_mkl_would_skip_avx512(vendor, capability, expected):
    assert vlinear.prefers_onednn(vendor, capability) is expected
