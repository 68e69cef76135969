"""Fully connected layers whose CPU matmuls run through oneDNN instead of the default BLAS, where that is faster.

PyTorch's CPU build does float32 matmuls (`F.linear`, `@`) with Intel MKL, which dispatches on the
CPU's vendor: on AMD processors it takes its AVX2 code path even where the core has full-width
AVX-512. oneDNN (bundled with PyTorch as MKL-DNN, the library behind its CPU convolutions) chooses by
instruction set instead. On an AMD EPYC (Zen 5) its float32 matmul runs at 1.0-2.4x MKL's rate on
the MLP VAE's products and ~2.1x on large square ones (benchmarks/matmul_backends.py); on an Intel
Xeon with AVX-512 and AMX (Sapphire Rapids class) MKL matches or beats it on every product (oneDNN at
0.45-1.15x), and on an AMD EPYC without AVX-512 (Zen 3), where MKL's AVX2 path is the right one, too
(oneDNN at 0.72-0.99x). On a Zen 4 EPYC (AVX-512) oneDNN ran at 0.52-1.56x MKL's rate per product and a
training step took the same time either way (2026-12-02). So layers use oneDNN only on non-Intel CPUs with
AVX-512 (PREFER_ONEDNN); elsewhere, other architectures included (not measured), they stay nn.Linear's.
While torch.compile traces they take F.linear: inductor lowers oneDNN's linear op only for frozen weights.
The values are float32 products either way (no reduced-precision arithmetic unless torch's mkldnn
fp32_precision is set to bf16 or tf32); they differ from MKL's only in summation order.

oneDNN has a fixed cost per call, so small layers (under MIN_MACS multiply-adds per product; a layer's
three products, forward and both gradients, have the same count) stay on BLAS, as do other devices and
dtypes. `torch.backends.mkldnn.enabled = False` (or the `onednn_off()` context) turns the oneDNN path off.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .system import cpu_info

MIN_MACS = 2**21  # below ~2M multiply-adds per product, oneDNN's per-call cost outweighs its faster kernel


def _onednn_op():
    try:
        # the op torch.compile's CPU backend calls for linear layers; its overload directly (~1 us a call less)
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _onednn_op()
_AVAILABLE = _LINEAR is not None and torch.backends.mkldnn.is_available()


def prefers_onednn(vendor: str, capability: str) -> bool:
    """Whether layers should use oneDNN on a CPU of this vendor (system.cpu_info's) and ATen capability
    (torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", ...).

    MKL picks its kernels by CPU vendor: its AVX-512 path on Intel, where it matches or beats oneDNN on
    every product of the MLP VAE and a training step is ~20% faster than through oneDNN, and AVX2 elsewhere.
    On an AMD CPU with AVX-512 (Zen 5) oneDNN's AVX-512 kernels are up to 2.4x faster; on one without
    (Zen 3) both libraries run AVX2 and MKL's is the faster (oneDNN at 0.72-0.99x on every product; a
    training step at 1.26x plain autograd's time through oneDNN, 1.07x on MKL: benchmarks/matmul_backends.py,
    step_anatomy.py, 2026-12-01).
    """
    return vendor not in ("", "GenuineIntel") and capability.startswith("AVX512")


PREFER_ONEDNN = prefers_onednn(cpu_info().get("vendor", ""), torch.backends.cpu.get_cpu_capability())


def _onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Never while torch.compile traces (checked first: dynamo breaks the graph at _get_mkldnn_enabled):
    # inductor lowers mkldnn._linear_pointwise only for frozen (constant) weights and fails with a bare
    # AssertionError on a parameter, so a compiled step takes F.linear (aten.mm/addmm)
    return (not torch.compiler.is_compiling() and _AVAILABLE and a.dtype == b.dtype == torch.float32
            and a.device.type == b.device.type == "cpu"
            and torch._C._get_mkldnn_enabled())  # what torch.backends.mkldnn.enabled reads


def _nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, attr: str = "none") -> torch.Tensor:
    """a @ b.T (+ bias, then attr: "none" or "relu") through oneDNN; a and b CPU float32, 2-D.

    oneDNN reads b as it lies when it is contiguous or the transpose of a contiguous matrix (a layer's
    weight, or weight.t()); other strides are copied first, as is a non-contiguous a (torch's op does that).
    """
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()
    return _LINEAR(a, b, bias, attr, [], "")


@contextlib.contextmanager
def onednn_off():
    """Within it, vaelab.linear (and torch's oneDNN convolutions) use the default BLAS: for comparisons."""
    # allow_tf32=None leaves TF32 alone: setting it warns on builds without Intel GPU support
    with torch.backends.mkldnn.flags(enabled=False, allow_tf32=None):
        yield


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) for 2-D a (M, K) and b (N, K): through oneDNN where it can run, else F.linear."""
    return _nt(a, b, bias) if _onednn(a, b) else F.linear(a, b, bias)


class _OneDNNChain(torch.autograd.Function):
    """h_j = h_{j-1} W_j^T + b_j, or relu of it, for consecutive layers j = 1..n from h_0 = x, with every
    matmul (forward, input and weight gradients) through oneDNN; the ReLU is oneDNN's post-op on the
    forward product, and its backward masks by h_j > 0. One autograd node for the whole chain: a Python
    autograd.Function costs ~40 us a node, forward and backward, ~1% of an MLP VAE's step per layer.

    apply(x, relus, W_1, b_1, ..., W_n, b_n); a bias may be None.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, relus: tuple[bool, ...], *params: torch.Tensor | None) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])  # (M, in)
        hs = [h]
        for j, relu in enumerate(relus):
            h = _nt(h, params[2 * j], params[2 * j + 1], "relu" if relu else "none")  # (M, out_j)
            hs.append(h)
        ctx.save_for_backward(*hs, *params)  # a None bias is saved as None
        ctx.relus, ctx.input_shape = relus, x.shape
        return h.unflatten(0, x.shape[:-1])  # (..., out_n)

    @staticmethod
    @once_differentiable  # the oneDNN op has no derivative: a double backward raises instead of going wrong
    def backward(ctx, grad: torch.Tensor):
        n = len(ctx.relus)
        hs, weights = ctx.saved_tensors[:n + 1], ctx.saved_tensors[n + 1::2]
        grads: list[torch.Tensor | None] = [None] * (2 * n)
        needs = ctx.needs_input_grad[2:]
        g = grad.reshape(-1, grad.shape[-1])  # (M, out_n)
        grad_x = None
        for j in reversed(range(n)):
            if ctx.relus[j]:
                g = torch.ops.aten.threshold_backward(g, hs[j + 1], 0)  # ReLU's gradient: zero where h_j <= 0
            if needs[2 * j]:
                grads[2 * j] = _nt(g.t(), hs[j].t())  # (out, M) @ (M, in)
            if needs[2 * j + 1]:  # False for a None bias
                grads[2 * j + 1] = g.sum(0)
            if j > 0:
                g = _nt(g, weights[j].t())  # (M, out) @ (out, in)
            elif ctx.needs_input_grad[0]:  # skipped for a first layer fed with data
                grad_x = _nt(g, weights[0].t()).reshape(ctx.input_shape)
        return grad_x, None, *grads


def _fits(x: torch.Tensor, weight: torch.Tensor, features: int | None = None) -> bool:
    """Whether a layer's products go through oneDNN: M * in * out large enough, CPU float32, oneDNN on,
    and the layer takes `features` inputs (default: x's last dimension); a mismatch goes to F.linear,
    whose error names both shapes (oneDNN's does not).

    M is the number of rows of x (all dimensions but the last); weight is (out, in), and may belong to a
    later layer of a chain that starts at x (its rows stay M; features is then the previous layer's out).
    """
    rows = x.numel() // x.shape[-1] if x.dim() >= 2 and x.shape[-1] else 0
    features = x.shape[-1] if features is None else features
    return (PREFER_ONEDNN and weight.shape[1] == features and rows * weight.shape[0] * weight.shape[1] >= MIN_MACS
            and _onednn(x, weight))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           relu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias), then F.relu if relu, with CPU float32 matmuls through oneDNN (see the
    module docstring)."""
    if not _fits(x, weight):
        y = F.linear(x, weight, bias)
        return F.relu(y) if relu else y
    return _OneDNNChain.apply(x, (relu,), weight, bias)


class Linear(nn.Linear):
    """nn.Linear computed by `linear`: the same parameters, state-dict keys and initialisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not PREFER_ONEDNN:  # nothing goes to oneDNN on this CPU: nn.Linear's call, without the checks
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


class Sequential(nn.Sequential):
    """nn.Sequential that runs each stretch of consecutive Linear layers (each optionally followed by
    nn.ReLU) that `linear` would send to oneDNN as one _OneDNNChain, ReLUs fused into the products.

    The modules, their order and the state-dict keys are nn.Sequential's; only the forward pass fuses
    (one pass over each hidden activation fewer, forward and backward, and one autograd node per
    stretch: ~7% of an MLP VAE's training step), so forward hooks on fused layers do not run.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not PREFER_ONEDNN:  # no stretch would be fused on this CPU: nn.Sequential's loop (~0.05 ms a step less)
            return super().forward(x)
        layers = list(self)
        i = 0
        while i < len(layers):
            relus: list[bool] = []
            params: list[torch.Tensor | None] = []
            features = x.shape[-1] if x.dim() else 0  # inputs of the chain's next layer
            while i < len(layers) and isinstance(layers[i], Linear) and _fits(x, layers[i].weight, features):
                relu = i + 1 < len(layers) and type(layers[i + 1]) is nn.ReLU
                relus.append(relu)
                params += [layers[i].weight, layers[i].bias]
                features = layers[i].out_features
                i += 2 if relu else 1
            if relus:
                x = _OneDNNChain.apply(x, tuple(relus), *params)
            else:
                x = layers[i](x)
                i += 1
        return x
