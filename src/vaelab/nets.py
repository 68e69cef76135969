"""Encoder and decoder bodies: plain nn.Modules, no probability in them.

An encoder maps images (B, C, H, W) to features (B, F); a decoder maps codes (B, D) to one
parameter per pixel (B, C, H, W), which a likelihood head turns into p(x|z).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError
from .linear import Linear, Sequential


def _activation(linear: bool) -> nn.Module:
    return nn.Identity() if linear else nn.ReLU()


class GatedLinear(nn.Module):
    """h = (W x + b) * sigmoid(V x + c): gated linear units (Dauphin et al. 2017), the "GatedDense" layers
    of the MLP VAEs in VampPrior (Tomczak & Welling 2018) and Exemplar VAE; one matmul for both halves."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = Linear(n_in, 2 * n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.glu(self.proj(x), dim=-1)


def mlp(sizes: list[int], *, linear: bool = False, last_activation: bool = False,
        activation: str = "relu") -> Sequential:
    """Layers between consecutive sizes: Linear + ReLU, or gated linear units; the last is plain Linear
    unless last_activation. linear=True drops every nonlinearity."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        hidden_layer = (i < len(sizes) - 2 or last_activation) and not linear
        if hidden_layer and activation == "gated":
            layers.append(GatedLinear(n_in, n_out))
        else:
            layers.append(Linear(n_in, n_out))
            if hidden_layer:
                layers.append(nn.ReLU())
    return Sequential(*layers)  # fuses each Linear + ReLU pair


class MLPEncoder(nn.Module):
    """Flatten, then a stack of fully connected layers."""

    def __init__(self, *, input_shape: tuple[int, int, int], hidden: tuple[int, ...], linear: bool = False,
                 activation: str = "relu"):
        super().__init__()
        self.body = mlp([math.prod(input_shape), *hidden], linear=linear, last_activation=True,
                        activation=activation)
        self.out_features = hidden[-1] if hidden else math.prod(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))  # (B, F)


class MLPDecoder(nn.Module):
    """Fully connected layers in the encoder's reverse order, one output per pixel."""

    def __init__(self, *, latent_dim: int, hidden: tuple[int, ...], output_shape: tuple[int, int, int],
                 linear: bool = False, activation: str = "relu"):
        super().__init__()
        self.output_shape = output_shape
        self.body = mlp([latent_dim, *reversed(hidden), math.prod(output_shape)], linear=linear,
                        activation=activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z).unflatten(-1, self.output_shape)  # (B, C, H, W)


def _relu_only(activation: str) -> None:
    if activation != "relu":
        raise ConfigError(f"--activation {activation} is for --net mlp; conv bodies use ReLU")


def _conv_sizes(size: int, n_layers: int) -> list[int]:
    """Spatial sizes after each stride-2 convolution (kernel 4, padding 1 halves, rounding down)."""
    sizes = [size]
    for _ in range(n_layers):
        sizes.append(sizes[-1] // 2)
    return sizes


class ConvEncoder(nn.Module):
    """Stride-2 convolutions with the given channel counts, then flatten."""

    def __init__(self, *, input_shape: tuple[int, int, int], hidden: tuple[int, ...], linear: bool = False,
                 activation: str = "relu"):
        super().__init__()
        _relu_only(activation)
        c, h, w = input_shape
        hs, ws = _conv_sizes(h, len(hidden)), _conv_sizes(w, len(hidden))
        if not hidden or min(hs[-1], ws[-1]) < 1:
            raise ConfigError(
                f"--net conv with --hidden {','.join(map(str, hidden)) or '(empty)'} needs images of at least "
                f"{2 ** len(hidden)}x{2 ** len(hidden)} pixels, got {h}x{w}; use fewer conv layers or --net mlp"
            )
        layers: list[nn.Module] = []
        for c_in, c_out in zip((c, *hidden[:-1]), hidden):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), _activation(linear)]
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.out_features = hidden[-1] * hs[-1] * ws[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, F)


class ConvDecoder(nn.Module):
    """A linear map to the encoder's last feature map, then stride-2 transposed convolutions back."""

    def __init__(self, *, latent_dim: int, hidden: tuple[int, ...], output_shape: tuple[int, int, int],
                 linear: bool = False, activation: str = "relu"):
        super().__init__()
        _relu_only(activation)
        c, h, w = output_shape
        hs, ws = _conv_sizes(h, len(hidden)), _conv_sizes(w, len(hidden))
        self.start = (hidden[-1], hs[-1], ws[-1])
        self.project = Sequential(Linear(latent_dim, math.prod(self.start)), _activation(linear))
        channels = (*reversed(hidden), c)
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            j = len(hidden) - i  # index of the target size in hs/ws
            # output_padding restores the pixel a floor-halving dropped on odd sizes
            pad = (hs[j - 1] - 2 * hs[j], ws[j - 1] - 2 * ws[j])
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, output_padding=pad))
            if i < len(hidden) - 1:  # no activation on the pixel parameters
                layers.append(_activation(linear))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).unflatten(-1, self.start))  # (B, C, H, W)


ENCODERS = {"mlp": MLPEncoder, "conv": ConvEncoder}
DECODERS = {"mlp": MLPDecoder, "conv": ConvDecoder}
