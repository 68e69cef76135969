"""Evaluation of a trained run: test loss terms, reconstruction error, and PCA/AE/VAE baselines beside it."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import runs
from .config import RunConfig
from .data import Dataset
from .fileio import atomic_write_text
from .train import EVAL_SEED, mean_terms, model_device, objective_for, prepare_data, train

BASELINES = ("pca", "ae", "vae")


@torch.no_grad()
def reconstruction_error(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> dict[str, float]:
    """Squared error between x and the model's mean reconstruction: per image (summed over pixels) and per pixel."""
    model.eval()
    device = model_device(model)
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        total += (model.reconstruct(xb) - xb).pow(2).sum().item()
    per_image = total / x.shape[0]
    return {"sse_per_image": per_image, "mse_per_pixel": per_image / math.prod(x.shape[1:])}


def test_metrics(model: nn.Module, config: RunConfig, data: Dataset) -> dict[str, Any]:
    """Test-set loss terms (for a VAE: -ELBO, reconstruction and KL in nats per example) and reconstruction error."""
    torch.manual_seed(EVAL_SEED)
    terms = mean_terms(model, objective_for(config), data.test.x)
    result: dict[str, Any] = {"model": config.model.model, "data": data.name, "n_test": int(data.test.x.shape[0])}
    result.update({f"test_{k}": v for k, v in terms.items()})
    if config.model.model == "vae":
        result["test_elbo"] = -terms["loss"]
    result.update(reconstruction_error(model, data.test.x))
    return result


def evaluate_run(run_dir: str | Path, *, device: str = "cpu", data: Dataset | None = None) -> dict[str, Any]:
    """Evaluate a run on its test split and write evaluation.json into the run directory."""
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir)
    model = runs.load(run_dir, device=device)
    data = prepare_data(config, data)
    result = test_metrics(model, config, data)
    atomic_write_text(run_dir / "evaluation.json", json.dumps(result, indent=2) + "\n")
    return result


def baseline_config(config: RunConfig, model: str) -> RunConfig:
    """The run's configuration with another --model: same data, latent size, net and budget."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, model=model, linear=False))


def compare_baselines(run_dir: str | Path, *, train_missing: bool = True, progress: bool = False,
                      data: Dataset | None = None) -> list[dict[str, Any]]:
    """PCA, AE and VAE at the run's latent size on the same test data: one row of errors per model.

    The run's own model fills its row; the others are trained (once) into RUN/baselines/<model>,
    with the run's settings, unless train_missing is False (then missing rows are left out).
    """
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir)
    data = prepare_data(config, data)
    rows = []
    for name in BASELINES:
        if name == config.model.model:
            source = run_dir
        else:
            source = run_dir / "baselines" / name
            if not runs.is_complete(source):
                if not train_missing:
                    continue
                resume = (source / "config.json").exists()  # a baseline cut off earlier continues
                train(baseline_config(config, name), source, resume=resume, dataset=data, progress=progress)
        model = runs.load(source)
        errors = reconstruction_error(model, data.test.x)
        rows.append({"model": name, "latent_dim": config.model.latent_dim, "run": str(source), **errors})
    return rows
