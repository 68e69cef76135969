"""The variational autoencoder: encoder -> q(z|x), decoder -> p(x|z), prior p(z)."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from ..latents import Noise, build_latent
from ..nets import ENCODERS
from .common import ImageDecoder, Output, check_codes, check_count, check_images


class VAE(nn.Module):
    """Kingma & Welling 2014, "Auto-Encoding Variational Bayes"; Rezende et al. 2014.

    Args:
        input_shape: (C, H, W) of the data.
        latent_dim: D, the size of z.
        net: "mlp" or "conv" encoder/decoder bodies.
        hidden: layer widths (mlp) or channel counts (conv), encoder order; the decoder mirrors them.
        likelihood: "bernoulli", "gaussian" (fixed sigma) or "gaussian-learned".
        sigma: the Gaussian likelihood's fixed (or initial) scale.
        linear: drop all nonlinearities (a linear-Gaussian model).
        activation: "relu" or "gated" (gated linear units) between the MLP layers.
        latent: "gaussian" (diagonal posterior, standard normal prior) or "vmf" (von Mises-Fisher
            posterior, uniform prior on the sphere S^(D-1)).
        kappa: fixed vMF concentration (None: learned).
        bn_mu: BN-VAE's fixed scale gamma of batch-normalised posterior means (None: off).
    """

    def __init__(self, *, input_shape: tuple[int, int, int], latent_dim: int, net: str = "mlp",
                 hidden: tuple[int, ...] = (512, 256), likelihood: str = "bernoulli", sigma: float = 0.1,
                 linear: bool = False, activation: str = "relu", latent: str = "gaussian", kappa: float | None = None,
                 bn_mu: float | None = None):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.encoder = ENCODERS[net](input_shape=self.input_shape, hidden=hidden, linear=linear,
                                     activation=activation)
        self.posterior = build_latent(latent, in_features=self.encoder.out_features, latent_dim=latent_dim,
                                      kappa=kappa, bn_mu=bn_mu)
        self.decoder = ImageDecoder(net=net, latent_dim=latent_dim, hidden=hidden, output_shape=self.input_shape,
                                    likelihood=likelihood, sigma=sigma, linear=linear,
                                    activation=activation)

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for images x (B, C, H, W): batch shape (B,), event shape (D,)."""
        return self._encode(x, "encode")

    def _encode(self, x: torch.Tensor, method: str) -> Distribution:
        """encode(x), its input checked under the name of the method called (once)."""
        check_images(x, self.input_shape, method, self)
        return self.posterior(self.encoder(x))

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for codes z (..., D): batch shape z.shape[:-1], event shape (C, H, W)."""
        check_codes(z, self.latent_dim, "decode", self)
        return self.decoder(z)

    def prior(self) -> Distribution:
        """p(z)."""
        return self.posterior.prior()

    def forward(self, x: torch.Tensor, k: int | None = None, noise: Noise | None = None) -> Output:
        """One pass with reparameterised samples: z (B, D), or (K, B, D) when k is given.

        noise: where the standard normal draws come from (default: torch's global generator).
        """
        qz = self._encode(x, "forward")
        z, score = self.posterior.rsample_and_score(qz, k, noise)
        # z comes from the checked x: decode's checks of a caller's codes would find nothing (~10 us a step)
        return Output(qz=qz, pz=self.prior(), z=z, px_z=self.decoder(z), k=k, score=score)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Point codes (B, D): the posterior modes, i.e. the means of a Gaussian posterior, and for vMF latents the
        mean direction on the sphere, where the decoder's codes live (the vMF mean lies inside the ball)."""
        return self._encode(x, "embed").mode

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z) at z = embed(x), shape of x."""
        return self.decoder(self._encode(x, "reconstruct").mode).mean

    @torch.no_grad()
    def sample(self, n: int, *, mean: bool = True) -> torch.Tensor:
        """n images from the model: z ~ p(z), then the mean of p(x|z) (or a draw from it)."""
        z = self.prior().sample((check_count(n, "sample"),))
        px_z = self.decoder(z)
        return px_z.mean if mean else px_z.sample()
