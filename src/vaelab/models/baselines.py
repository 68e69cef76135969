"""Baselines: PCA in closed form, and deterministic autoencoders (linear or deep)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution

from ..errors import ConfigError
from ..likelihoods import GaussianImage
from ..linear import Linear
from ..nets import ENCODERS
from .common import ImageDecoder, NoPrior, Output, check_codes, check_images


class PCA(NoPrior, nn.Module):
    """Principal component analysis, fitted in closed form, with probabilistic PCA's maximum-likelihood noise.

    Tipping & Bishop 1999, "Probabilistic Principal Component Analysis": the eigenvalues are those of the
    1/N-normalised sample covariance S, and the noise variance is the mean of the P - L discarded ones (eq. 8),
    counting the zero eigenvalues that N < P examples leave (so sigma^2 = (tr S - sum of the kept) / (P - L)).
    Codes are projections onto the components U and decode gives N(U z + mean, sigma^2 I): PPCA's p(x|z) for its
    code rescaled, U z = W z_ppca with W = U (Lambda - sigma^2 I)^(1/2), whose prior is N(0, I); reconstruct is the
    projection, not PPCA's posterior mean (which shrinks each coordinate by (lambda_i - sigma^2) / lambda_i).
    """


    def __init__(self, *, input_shape: tuple[int, int, int], latent_dim: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        n_features = math.prod(self.input_shape)
        if latent_dim > n_features:
            raise ConfigError(f"--latent-dim {latent_dim} exceeds the {n_features} pixels PCA can project onto")
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("components", torch.zeros(latent_dim, n_features))  # (L, P), orthonormal rows
        self.register_buffer("explained_variance", torch.zeros(latent_dim))
        self.register_buffer("noise_variance", torch.ones(()))

    @torch.no_grad()
    def check_data(self, x: torch.Tensor) -> None:
        """Refuse training images x (N, C, H, W) this PCA cannot be fitted to, before anything is written."""
        self._centred(x)

    def _centred(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images flattened and centred in float64, and their mean; or a one-line ConfigError."""
        if x.shape[0] < 2:
            raise ConfigError("PCA needs at least 2 training examples")
        if self.latent_dim > x.shape[0]:  # the SVD of N examples has at most N components
            raise ConfigError(f"--latent-dim {self.latent_dim}: PCA of {x.shape[0]} training examples has at most "
                              f"{x.shape[0]} components; lower --latent-dim or give more data")
        flat = x.flatten(1).double()
        mean = flat.mean(0)
        centred = flat - mean
        total = float(centred.pow(2).sum(1).mean())  # the eigenvalues' sum: each is at most this
        if total > torch.finfo(self.explained_variance.dtype).max:
            raise ConfigError(f"the training images' variance ({total:.3g} summed over pixels) overflows "
                              f"{self.explained_variance.dtype}: scale the data (values up to "
                              f"{float(x.abs().max()):.3g})")
        return centred, mean

    def fit(self, x: torch.Tensor) -> PCA:
        """Fit to images x (N, C, H, W) via the SVD of the centred data (in float64)."""
        centred, mean = self._centred(x)
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        eigenvalues = s**2 / centred.shape[0]  # of the maximum-likelihood covariance S (1/N, not 1/(N - 1))
        components = vh[: self.latent_dim]
        # deterministic signs: the largest-magnitude loading of each component is positive
        signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
        n_features, discarded = centred.shape[1], eigenvalues[self.latent_dim:].sum()
        # the SVD gives min(N, P) eigenvalues: the rest are 0 and count in the mean (Tipping & Bishop, eq. 8)
        noise = discarded / (n_features - self.latent_dim) if n_features > self.latent_dim else discarded * 0
        self.mean.copy_(mean)
        self.components.copy_(components * signs)
        self.explained_variance.copy_(eigenvalues[: self.latent_dim])
        self.noise_variance.copy_(noise.clamp_min(1e-6))
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Projections onto the principal components, (B, L)."""
        return self._project(x, "encode")

    def _project(self, x: torch.Tensor, method: str) -> torch.Tensor:
        """encode(x), its input checked under the name of the method called (once)."""
        check_images(x, self.input_shape, method, self)
        return (x.flatten(1) - self.mean) @ self.components.T

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) = N(W z + mean, sigma^2 I) with W the components, over images (C, H, W)."""
        check_codes(z, self.latent_dim, "decode", self)
        return self._likelihood(z)

    def _likelihood(self, z: torch.Tensor) -> Distribution:
        """decode(z) without the checks of a caller's codes."""
        loc = (z @ self.components + self.mean).unflatten(-1, self.input_shape)
        return GaussianImage(loc, self.noise_variance.sqrt(), checked=not self.training)

    @torch.no_grad()
    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) of images x under probabilistic PCA, x ~ N(mean, W W^T + sigma^2 I): (B,), float64.

        With the maximum-likelihood W = U (Lambda - sigma^2 I)^(1/2) (Tipping & Bishop 1999, eq. 7) the
        covariance has eigenvalue lambda_i along component u_i and sigma^2 elsewhere, so its log-determinant
        is sum log lambda_i + (P - L) log sigma^2 and (x - mean)^T C^-1 (x - mean) is
        |x - mean|^2 / sigma^2 - sum_i (u_i^T (x - mean))^2 (1 / sigma^2 - 1 / lambda_i): no P x P matrix.
        """
        check_images(x, self.input_shape, "log_marginal", self)
        centred = x.flatten(1).double() - self.mean.double()
        projections = centred @ self.components.double().T
        noise = self.noise_variance.double()
        eigenvalues = self.explained_variance.double().clamp_min(noise)  # >= sigma^2 for a fitted model
        n_features = centred.shape[1]
        log_det = eigenvalues.log().sum() + (n_features - self.latent_dim) * noise.log()
        mahalanobis = centred.pow(2).sum(1) / noise - (projections.pow(2) * (1 / noise - 1 / eigenvalues)).sum(1)
        return -0.5 * (n_features * math.log(2 * math.pi) + log_det + mahalanobis)

    def forward(self, x: torch.Tensor) -> Output:
        z = self._project(x, "forward")
        return Output(qz=None, pz=None, z=z, px_z=self._likelihood(z))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Point codes (B, L)."""
        return self._project(x, "embed")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Projection onto the principal subspace, shape of x."""
        return self._likelihood(self._project(x, "reconstruct")).mean



class AE(NoPrior, nn.Module):
    """Deterministic autoencoder trained on -log p(x|z) with z = f(x); linear=True drops all nonlinearities.

    A linear AE with a Gaussian likelihood spans PCA's principal subspace at its optimum
    (Baldi & Hornik 1989, "Neural networks and principal component analysis").
    """


    def __init__(self, *, input_shape: tuple[int, int, int], latent_dim: int, net: str = "mlp",
                 hidden: tuple[int, ...] = (512, 256), likelihood: str = "bernoulli", sigma: float = 0.1,
                 linear: bool = False, activation: str = "relu"):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.encoder = ENCODERS[net](input_shape=self.input_shape, hidden=hidden, linear=linear,
                                     activation=activation)
        self.code = Linear(self.encoder.out_features, latent_dim)
        self.decoder = ImageDecoder(net=net, latent_dim=latent_dim, hidden=hidden, output_shape=self.input_shape,
                                    likelihood=likelihood, sigma=sigma, linear=linear,
                                    activation=activation)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code z = f(x), (B, L)."""
        return self._code(x, "encode")

    def _code(self, x: torch.Tensor, method: str) -> torch.Tensor:
        """encode(x), its input checked under the name of the method called (once)."""
        check_images(x, self.input_shape, method, self)
        return self.code(self.encoder(x))

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for codes z (..., L)."""
        check_codes(z, self.latent_dim, "decode", self)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> Output:
        z = self._code(x, "forward")
        return Output(qz=None, pz=None, z=z, px_z=self.decoder(z))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Point codes (B, L)."""
        return self._code(x, "embed")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|f(x)), shape of x."""
        return self.decoder(self._code(x, "reconstruct")).mean

