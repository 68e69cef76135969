"""Building blocks of the hierarchical VAE: NVAE's residual cells, and spectral norms for its regulariser.

Vahdat & Kautz 2020, "NVAE: A Deep Hierarchical Variational Autoencoder". Shapes: (B, c, h, w) feature maps.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear

RESIDUAL_SCALE = 0.1  # NVAE's cells add 0.1 * branch to the skip: early training stays close to the identity
POWER_EPS = 1e-12  # guards the normalisation in power iteration against an all-zero weight


class SqueezeExcite(nn.Module):
    """x * sigmoid(W2 relu(W1 mean_hw(x))): channel gates from global context (Hu et al. 2018; NVAE Fig. 3)."""

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 4):
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.gate = nn.Sequential(Linear(channels, hidden), nn.ReLU(), Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean((2, 3)))[:, :, None, None]  # (B, c, h, w)


class ResidualCell(nn.Module):
    """NVAE's residual cell (Fig. 3b): skip(x) + 0.1 * SE(Conv3x3(Swish(BN(Conv3x3(Swish(BN(x))))))).

    NVAE uses this cell in the encoder and a depthwise-separable cell in the decoder; here both sides use it,
    because depthwise convolutions are slow on CPUs. resample: None, "down" (stride 2, size ceil(h / 2)) or
    "up" (nearest-neighbour to out_size before the first convolution); the skip resamples with a 1x1 conv
    whenever the shape changes.
    """

    def __init__(self, c_in: int, c_out: int, *, resample: str | None = None,
                 out_size: tuple[int, int] | None = None):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        if resample == "up" and out_size is None:
            raise ValueError("an upsampling cell needs out_size")
        self.resample, self.out_size = resample, out_size
        stride = 2 if resample == "down" else 1
        self.pre = nn.Sequential(nn.BatchNorm2d(c_in), nn.SiLU())  # Swish (Ramachandran et al. 2017) = SiLU
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)  # BN follows: no bias
        self.branch = nn.Sequential(nn.BatchNorm2d(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                                    SqueezeExcite(c_out))
        self.skip = nn.Identity()
        if resample is not None or c_in != c_out:
            self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride)

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.out_size, mode="nearest") if self.resample == "up" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.branch(self.conv1(self._up(self.pre(x))))
        return self.skip(self._up(x)) + RESIDUAL_SCALE * branch


class SpectralNorms(nn.Module):
    """Largest singular values of weights reshaped to (out, -1), by power iteration (Miyato et al. 2018, Alg. 1).

    One vector u per weight is kept as a persistent buffer, so the estimates improve from step to step (and
    survive a checkpoint) while each call needs only a few iterations, as in NVAE's spectral regulariser
    (Sec. 3.3.2). Weights are passed in at call time, in the order given at construction, so that this
    module holds no second reference to the model's parameters.
    """

    def __init__(self, shapes: Sequence[torch.Size]):
        super().__init__()
        self.n = len(shapes)
        for i, shape in enumerate(shapes):
            self.register_buffer(f"u{i}", F.normalize(torch.randn(shape[0]), dim=0, eps=POWER_EPS))

    def forward(self, weights: Sequence[torch.Tensor], iterations: int = 1) -> torch.Tensor:
        """Estimates sigma_max(W_i) = u^T W v, (n,): differentiable in the weights; u, v are updated without grad."""
        if len(weights) != self.n:
            raise ValueError(f"expected {self.n} weights, got {len(weights)}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        sigmas = []
        for i, weight in enumerate(weights):
            w = weight.reshape(weight.shape[0], -1)  # (out, in * kh * kw)
            buffer = getattr(self, f"u{i}")
            with torch.no_grad():
                u = buffer
                for _ in range(iterations):
                    v = F.normalize(w.t() @ u, dim=0, eps=POWER_EPS)
                    u = F.normalize(w @ v, dim=0, eps=POWER_EPS)
                buffer.copy_(u)
            # u and v are fresh tensors, not the buffer: a later in-place update cannot disturb this graph
            sigmas.append(torch.dot(u, w @ v))
        return torch.stack(sigmas)
