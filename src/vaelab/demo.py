"""`vaelab demo`: a VAE on the embedded MNIST digits, with PCA and AE beside it, and its report."""
from __future__ import annotations

import sys
from pathlib import Path

from . import runs
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .prepare import prepare_data
from .reports import write_report
from .train import train

DEMO_CONFIG = RunConfig(
    data=DataConfig(name="mnist5k", binarize="dynamic"),
    model=ModelConfig(model="vae", net="mlp", hidden=(512, 256), latent_dim=16, likelihood="bernoulli"),
    train=TrainConfig(epochs=30, batch_size=128, lr=1e-3, warmup_epochs=5, seed=0),
)


def run_demo(out: Path, *, epochs: int = 30, progress: bool = True) -> Path:
    """Train the demo VAE in OUT/vae to `epochs` (finishing or extending an earlier demo there) and write its
    report; returns the report's path. An earlier demo of more epochs is reported as it is, and says so."""
    config = RunConfig(data=DEMO_CONFIG.data, model=DEMO_CONFIG.model,
                       train=TrainConfig(**{**DEMO_CONFIG.train.__dict__, "epochs": epochs}))
    run_dir = Path(out) / "vae"
    data = prepare_data(config)
    started = (run_dir / "config.json").exists()
    done = runs.latest_checkpoint(run_dir).epoch if started else 0
    # a fresh demo (--epochs 0 too: it failed, asking for a run), one cut off, or a shorter one (is_complete
    # alone kept a 2-epoch demo at 2)
    if not started or done < epochs:
        train(config, run_dir, resume=started, dataset=data, progress=progress)
    elif done > epochs:
        print(f"{run_dir} holds a demo of {done} epochs; reporting it as it is (delete the folder to train "
              f"{epochs})", file=sys.stderr)
    return write_report(run_dir, baselines=True, progress=progress, data=data)
