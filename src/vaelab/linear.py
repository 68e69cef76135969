"""Fully connected layers whose CPU matmuls run through oneDNN instead of the default BLAS.

PyTorch's CPU build does float32 matmuls (`F.linear`, `@`) with Intel MKL, which dispatches on the
CPU's vendor: on AMD processors it takes its AVX2 code path even where the core has full-width
AVX-512. oneDNN (bundled with PyTorch as MKL-DNN, the library behind its CPU convolutions) chooses by
instruction set instead. On this project's machine (AMD EPYC, Zen 5) its float32 matmul runs at 1.0-2.4x
MKL's rate on the MLP VAE's products and ~2.1x on large square ones (benchmarks/matmul_backends.py);
on Intel CPUs, where MKL takes its AVX-512 path, the gain should be smaller (not measured). The
values are float32 products either way (no reduced-precision arithmetic unless torch's mkldnn
fp32_precision is set to bf16 or tf32); they differ from MKL's only in summation order.

oneDNN has a fixed cost per call, so small layers (under MIN_MACS multiply-adds per product; a layer's
three products, forward and both gradients, have the same count) stay on BLAS, as do other devices and
dtypes. `torch.backends.mkldnn.enabled = False` (or its `flags` context) turns the oneDNN path off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

MIN_MACS = 2**21  # below ~2M multiply-adds per product, oneDNN's per-call cost outweighs its faster kernel


def _onednn_op():
    try:
        return torch.ops.mkldnn._linear_pointwise  # the op torch.compile's CPU backend calls for linear layers
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _onednn_op()
_AVAILABLE = _LINEAR is not None and torch.backends.mkldnn.is_available()


def _onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (_AVAILABLE and a.dtype == b.dtype == torch.float32 and a.device.type == b.device.type == "cpu"
            and torch._C._get_mkldnn_enabled())  # what torch.backends.mkldnn.enabled reads


def _nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, attr: str = "none") -> torch.Tensor:
    """a @ b.T (+ bias, then attr: "none" or "relu") through oneDNN; a and b CPU float32, 2-D.

    oneDNN reads b as it lies when it is contiguous or the transpose of a contiguous matrix (a layer's
    weight, or weight.t()); other strides are copied first, as is a non-contiguous a (torch's op does that).
    """
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()
    return _LINEAR(a, b, bias, attr, [], "")


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) for 2-D a (M, K) and b (N, K): through oneDNN where it can run, else F.linear."""
    return _nt(a, b, bias) if _onednn(a, b) else F.linear(a, b, bias)


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b, or relu of it, with all three matmuls (forward, input and weight gradients) through
    oneDNN; the ReLU is oneDNN's post-op on the forward product, and its backward masks by y > 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        y = _nt(x2, weight, bias, "relu" if relu else "none")  # (M, out)
        ctx.save_for_backward(x2, weight, y if relu else None)
        ctx.input_shape, ctx.has_bias = x.shape, bias is not None
        return y.unflatten(0, x.shape[:-1])  # (..., out)

    @staticmethod
    @once_differentiable  # the oneDNN op has no derivative: a double backward raises instead of going wrong
    def backward(ctx, grad: torch.Tensor):
        x2, weight, y = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, out)
        if y is not None:
            g = torch.ops.aten.threshold_backward(g, y, 0)  # ReLU's gradient: zero where y <= 0
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # skipped for a first layer fed with data
            grad_x = _nt(g, weight.t()).reshape(ctx.input_shape)  # (M, out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_w = _nt(g.t(), x2.t())  # (out, M) @ (M, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           relu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias), then F.relu if relu, with CPU float32 matmuls through oneDNN (see the
    module docstring)."""
    macs = x.numel() * weight.shape[0]  # M * in * out
    if x.dim() < 2 or macs < MIN_MACS or not _onednn(x, weight):
        y = F.linear(x, weight, bias)
        return F.relu(y) if relu else y
    return _OneDNNLinear.apply(x, weight, bias, relu)


class Linear(nn.Linear):
    """nn.Linear computed by `linear`: the same parameters, state-dict keys and initialisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Sequential(nn.Sequential):
    """nn.Sequential that computes each Linear directly followed by nn.ReLU as one `linear(..., relu=True)`.

    The modules, their order and the state-dict keys are nn.Sequential's; only the forward pass fuses
    (one pass over the layer's output fewer, forward and backward: ~5% of an MLP VAE's training step),
    so forward hooks registered on a fused Linear or ReLU do not run.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, Linear) and i + 1 < len(layers) and type(layers[i + 1]) is nn.ReLU:
                x = linear(x, layer.weight, layer.bias, relu=True)
                i += 2
            else:
                x = layer(x)
                i += 1
        return x
