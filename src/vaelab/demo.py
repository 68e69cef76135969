"""`vaelab demo`: a VAE on the embedded MNIST digits, with PCA and AE beside it, and its report."""
from __future__ import annotations

from pathlib import Path

from . import runs
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .reports import write_report
from .train import prepare_data, train

DEMO_CONFIG = RunConfig(
    data=DataConfig(name="mnist5k", binarize="dynamic"),
    model=ModelConfig(model="vae", net="mlp", hidden=(512, 256), latent_dim=16, likelihood="bernoulli"),
    train=TrainConfig(epochs=30, batch_size=128, lr=1e-3, warmup_epochs=5, seed=0),
)


def run_demo(out: Path, *, epochs: int = 30, progress: bool = True) -> Path:
    """Train (or finish) the demo VAE in OUT/vae and write its report; returns the report's path."""
    config = RunConfig(data=DEMO_CONFIG.data, model=DEMO_CONFIG.model,
                       train=TrainConfig(**{**DEMO_CONFIG.train.__dict__, "epochs": epochs}))
    run_dir = Path(out) / "vae"
    data = prepare_data(config)
    if not runs.is_complete(run_dir):
        train(config, run_dir, resume=(run_dir / "config.json").exists(), dataset=data, progress=progress)
    return write_report(run_dir, baselines=True, progress=progress, data=data)
