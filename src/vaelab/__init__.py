"""vaelab: variational autoencoders from PCA to deep hierarchies: train, evaluate, explore."""
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import VaelabError
from .runs import load
from .train import train

__version__ = "0.1.0"

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "VaelabError", "load", "train", "__version__"]
