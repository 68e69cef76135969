"""Models: PCA and autoencoders as baselines, the VAE and its hierarchy; MODELS maps --model names to classes."""
from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .baselines import AE, PCA
from .common import Output
from .hvae import HVAE, HierarchicalOutput
from .text_vae import TextVAE
from .vae import VAE

MODELS: dict[str, type[nn.Module]] = {"pca": PCA, "ae": AE, "vae": VAE, "hvae": HVAE, "text-vae": TextVAE}


def build_model(config: ModelConfig) -> nn.Module:
    """Construct the model a ModelConfig describes (input_shape must be set); keeps the config on it."""
    if config.input_shape is None:
        raise ConfigError("model config has no input_shape; it is filled in from the data before building")
    cls = MODELS[config.model]
    accepted = inspect.signature(cls).parameters  # PCA takes only the shapes
    try:
        model = cls(**{k: v for k, v in dataclasses.asdict(config).items() if k in accepted})
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as RuntimeError
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        raise ConfigError(
            f"the {config.model} model (--hidden {','.join(map(str, config.hidden))}, --latent-dim "
            f"{config.latent_dim}, input {config.input_shape}) needs more memory than there is; "
            "choose smaller --hidden sizes or --latent-dim"
        ) from None
    model.config = config
    return model


__all__ = ["AE", "HVAE", "HierarchicalOutput", "MODELS", "Output", "PCA", "TextVAE", "VAE", "build_model"]
