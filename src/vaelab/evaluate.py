"""The evaluation suite of a trained run, written to RUN/evaluation.json, and comparisons of several runs.

    test NLL (importance-sampled, K samples) in nats and bits/dim, with its standard error and ESS
    test ELBO = -(reconstruction + KL), KL per latent dimension, active units, I(x; z)
    linear probes on the codes, on PCA features of equal size and on pixels
    reconstruction error of PCA, AE and VAE at the same latent size (compare_baselines)
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import runs
from .config import RunConfig
from .data import Dataset, binarize
from .data.dataset import EIGHT_BIT_LEVELS
from .data.text import token_counts
from .density import importance_sample, log_likelihood, nll_summary
from .errors import ConfigError, VaelabError
from .fileio import atomic_write_text
from .flags import without_ignored_settings
from .latent_stats import active_units, active_units_per_group, kl_per_unit, linear_probes, mutual_information_bounds
from .models import PCA
from .models.common import has_prior
from .objectives import elbo
from .prepare import EVAL_SEED, prepare_data
from .steps import mean_terms, objective_for
from .system import in_eval_mode, model_device
from .text_views import token_accuracy
from .train import train

BASELINES = ("pca", "ae", "vae")
# Raised whenever a number in evaluation.json is defined anew; a file of another format is evaluated again, not
# shown. Files of format 1 have no "format" key: they may predate changes in how an HVAE's latent statistics
# count its sizes, whether autoencoders and PCA report a KL, and which test images a binarised run's ELBO is of.
EVALUATION_FORMAT = 2
COMPARE_COLUMNS = [  # (key in evaluation.json, column title)
    ("model", "model"), ("data", "data"), ("latent_dim", "z"), ("epoch", "epochs"),
    ("nll", "NLL (nats)"), ("nll_k", "K"), ("perplexity", "PPL"), ("test_elbo", "ELBO"), ("test_recon", "recon"),
    ("test_kl", "KL"),
    ("active_units", "active units"), ("mutual_information", "I(x;z) >="), ("probe_accuracy_latent", "probe acc"),
    ("sse_per_image", "sq. error/image"),
]

__all__ = ["evaluate_run", "log_likelihood", "importance_sample", "compare_runs", "compare_baselines"]


@torch.no_grad()
@in_eval_mode
def reconstruction_error(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> dict[str, float]:
    """Squared error between x and the model's mean reconstruction: per image (summed over pixels) and per pixel."""
    device = model_device(model)
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        total += (model.reconstruct(xb) - xb).pow(2).sum().item()
    per_image = total / x.shape[0]
    return {"sse_per_image": per_image, "mse_per_pixel": per_image / math.prod(x.shape[1:])}


def has_nll(model: nn.Module) -> bool:
    """Whether the model has a log p(x): importance-sampled through its posterior, or PCA's exact one."""
    return has_prior(model) or isinstance(model, PCA)


def nll_test_set(config: RunConfig, data: Dataset) -> tuple[torch.Tensor, int | None]:
    """The test images log p(x) is estimated on, and the seed they were binarised with (None: as given).

    With --binarize, prepare_data has binarised the test split once with EVAL_SEED. A Bernoulli model
    trained on grey values is scored on the test split binarised the same way, as a Bernoulli
    likelihood is a density only on binary data.
    """
    x = data.test.x
    if data.is_text:
        return x, None
    if config.data.binarize != "none":
        return x, EVAL_SEED
    if config.model.bernoulli and not bool(((x == 0) | (x == 1)).all()):
        return binarize(x, torch.Generator().manual_seed(EVAL_SEED)), EVAL_SEED
    return x, None


def latent_size(model: nn.Module, config: RunConfig) -> int:
    """How many latent variables the model has: a hierarchical VAE's in all its groups (--latent-dim is its
    channels per group, and encode() gives the top group alone)."""
    return sum(model.group_sizes) if hasattr(model, "group_sizes") else config.model.latent_dim


def elbo_terms(model: nn.Module, config: RunConfig, x: torch.Tensor) -> dict[str, float]:
    """Test loss terms: for a VAE the single-sample ELBO with analytic KL (whatever the training objective)."""
    torch.manual_seed(EVAL_SEED)
    if not has_prior(model):  # -log p(x|z) at the code; no KL term (its 0 read as a collapsed posterior)
        return {f"test_{k}": v for k, v in mean_terms(model, objective_for(config), x).items() if k != "kl"}
    terms = mean_terms(model, lambda m, xb, beta: elbo(m(xb), xb, beta=beta), x)
    return {"test_loss": terms["loss"], "test_recon": terms["recon"], "test_kl": terms["kl"],
            "test_elbo": -terms["loss"]}


def test_metrics(model: nn.Module, config: RunConfig, data: Dataset, *, nll_k: int | None = None,
                 probe: bool = True, chunk: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Every metric of the suite on the test split (NLL only when nll_k is given; progress: its bar, on a
    terminal)."""
    x = data.test.x
    result: dict[str, Any] = {"model": config.model.model, "data": data.name,
                              "latent_dim": latent_size(model, config), "n_test": int(x.shape[0])}
    if hasattr(model, "group_sizes"):  # what encode() gives, and the statistics below are of
        result["latent_top_dim"] = model.latent_dim
    # a VAE's bound, its terms and the statistics of its posterior are of the test set its NLL is: binarised
    # once where a Bernoulli model was trained on grey values (the ELBO of grey images beside the NLL of binary
    # ones read as a gap from importance sampling twice its size)
    # (an autoencoder's test split is binarised by prepare_data when the run binarises, and used as it is)
    scored, seed = nll_test_set(config, data) if has_prior(model) else (
        x, EVAL_SEED if config.data.binarize != "none" else None)
    result["test_binarize_seed"] = seed  # the test set the loss terms are of (compare marks a mix)
    result.update(elbo_terms(model, config, scored))
    if data.is_text:
        result["token_accuracy"] = token_accuracy(model, x)
    else:
        result.update(reconstruction_error(model, x))
    if has_prior(model):
        hierarchy = hasattr(model, "group_means")  # KL and active units per latent group
        torch.manual_seed(EVAL_SEED)  # the ELBO's draws (a lower group's KL depends on the z above it): these
        result["kl_per_group" if hierarchy else "kl_per_dim"] = kl_per_unit(model, scored)  # add up to test_kl
        if hierarchy:
            result["active_units_per_group"] = active_units_per_group(model, scored)
        result.update(active_units(model, scored))  # of the top group, for a hierarchy
        result.update(mutual_information_bounds(model, scored))
    if nll_k is not None:
        if not has_nll(model):
            raise ConfigError(f"--nll needs a model of p(x): a VAE (importance-sampled) or PCA (exact), not "
                              f"--model {config.model.model}, whose codes are deterministic")
        x_nll = scored  # nll_test_set's, for PCA as for a VAE (the models with an NLL)
        # a Gaussian's log p(x) is a density of the values (pixels in [0, 1]), above 0 nats or below; in bits per
        # dimension it would read as a discrete model's, so none is given unless the run was trained and is
        # scored on dequantised 8-bit pixels: then -log P(8-bit image) <= -log p(x) + D log 256 in
        # expectation (Theis et al. 2016, Sec. 3.1), and that bound is the bits per dimension
        density = not data.is_text and not config.model.bernoulli
        per_dim = math.prod(x.shape[1:]) if not data.is_text and (config.data.dequantize or not density) else None
        if isinstance(model, PCA):  # probabilistic PCA's Gaussian marginal, in closed form
            result.update(nll_summary(model.log_marginal(x_nll.to(model_device(model))), per_dim), nll_exact=True)
        else:
            estimate = importance_sample(model, x_nll, k=nll_k, chunk=chunk, seed=EVAL_SEED, progress=progress)
            result.update(estimate.summary(per_dim, tokens=token_counts(x_nll) if data.is_text else None))
        if density:
            result["nll_density"] = True
            if config.data.dequantize:  # + D log 256 nats is + log2(256) = 8 bits per dimension
                result["nll_bits_per_dim"] += math.log2(EIGHT_BIT_LEVELS)
                result["nll_dequantized"] = True
    if probe and data.train.y is not None:
        with warnings.catch_warnings():  # lbfgs may stop at max_iter on raw pixels; the accuracy stands
            warnings.simplefilter("ignore")
            result.update(linear_probes(data.train.x, data.train.y, x, data.test.y, model))
    return result


def evaluate_run(run_dir: str | Path, *, nll_k: int | None = None, probe: bool = True, chunk: int | None = None,
                 device: str = "cpu", data: Dataset | None = None,
                 checkpoint: runs.Checkpoint | None = None, model: nn.Module | None = None,
                 write: bool = True, progress: bool = False) -> dict[str, Any]:
    """Evaluate a run's latest checkpoint on its test split and write RUN/evaluation.json.

    Args:
        run_dir: a trained run directory.
        nll_k: estimate log p(x) with this many importance samples (None: skip, but keep an earlier
            estimate of the same checkpoint and format found in evaluation.json).
        probe: fit the linear probes (needs labels).
        chunk: importance samples per pass.
        device: where to run the model.
        data: the run's data set, if already loaded.
        checkpoint: the checkpoint to evaluate (default: the latest, read once: of a run still training, a
            separate read of latest.json labelled the weights of one epoch with the next).
        model: the checkpoint's model, already loaded (a run still training may prune its folder meanwhile).
        write: write RUN/evaluation.json (else the caller does, with write_evaluation).
        progress: show the NLL estimate's progress on stderr, when it is a terminal.
    """
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir)
    checkpoint = checkpoint or runs.latest_checkpoint(run_dir)
    model = model if model is not None else runs.load(run_dir, device=device, checkpoint=checkpoint)
    epoch = checkpoint.epoch
    objective = config.train.objective if has_prior(model) else None  # AE/PCA: no bound was trained
    result = {"run": str(run_dir), "epoch": epoch, "format": EVALUATION_FORMAT, "objective": objective,
              **test_metrics(model, config, prepare_data(config, data), nll_k=nll_k, probe=probe, chunk=chunk,
                             progress=progress)}
    previous = read_evaluation(run_dir)
    if nll_k is None and not stale(previous, epoch) and "nll" in previous:
        kept = ("nll", "ess_", "test_binarize", "perplexity")  # what --nll estimated (perplexity: text's)
        result.update({k: v for k, v in previous.items() if k.startswith(kept)})
    if write:
        write_evaluation(run_dir, result)
    return result


def write_evaluation(run_dir: str | Path, result: dict[str, Any]) -> Path:
    """Write an evaluate_run result as RUN/evaluation.json, atomically; returns its path. A file it replaces that
    holds an NLL estimate the result lacks (of another checkpoint or format: hours of importance sampling, dropped
    by a report or a compare) is kept as RUN/evaluation.previous.json, with a note."""
    path = Path(run_dir) / "evaluation.json"
    previous = read_evaluation(run_dir)
    if "nll" in previous and "nll" not in result:
        kept = path.with_name("evaluation.previous.json")
        atomic_write_text(kept, json.dumps(previous, indent=2) + "\n")
        why = stale(previous, result.get("epoch")) or "not carried over"
        print(f"vaelab: note: {path} held an NLL estimate ({why}); it is kept in {kept.name} (vaelab evaluate "
              f"{run_dir} --nll estimates it anew)", file=sys.stderr)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


def read_evaluation(run_dir: Path) -> dict[str, Any]:
    """RUN/evaluation.json, or {} when there is none (or it is unreadable, or not a JSON object: evaluate then
    writes it again)."""
    try:
        result = json.loads((Path(run_dir) / "evaluation.json").read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return result if isinstance(result, dict) else {}


def stale(evaluation: dict[str, Any], epoch: int | None) -> str | None:
    """Why an evaluation.json's numbers are not those of the checkpoint of `epoch` (None: of any) as vaelab defines
    them now (another epoch's, left by training on without a report, or another format's), or None if they are."""
    if epoch is not None and evaluation.get("epoch", epoch) != epoch:
        return f"evaluation.json is of epoch {evaluation.get('epoch')}, the run is at epoch {epoch}"
    found = evaluation.get("format", 1)
    if found != EVALUATION_FORMAT:
        which = "an older" if isinstance(found, int) and found < EVALUATION_FORMAT else "another"
        return (f"evaluation.json was written by {which} vaelab (format {found}; this one writes "
                f"{EVALUATION_FORMAT}), which defines its test metrics otherwise")
    return None


def compare_runs(run_dirs: list[Path]) -> tuple[list[dict[str, Any]], str]:
    """One row per run from its evaluation.json (evaluated now if missing, or if it is stale: of an earlier
    checkpoint than the run's latest, or of another vaelab's definitions), and the table as Markdown."""
    rows = []
    for run_dir in run_dirs:
        result = read_evaluation(run_dir)
        epoch = runs.latest_checkpoint(Path(run_dir)).epoch
        why = stale(result, epoch) if result else None
        if why:
            print(f"{run_dir}: {why}: evaluating it again", file=sys.stderr)
        if not result or why:
            result = evaluate_run(run_dir, probe=False)
        rows.append({**result, "run": str(run_dir)})  # as given: evaluation.json has the path it was evaluated by
    columns = [("run", "run"), *COMPARE_COLUMNS]
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = {key: _cell(row.get(key)) for key, _ in columns}
        if row.get("nll_density") and cells["nll"]:  # not comparable with the discrete NLLs beside it
            cells["nll"] += " (density)"
        if row.get("nll_exact") and cells["nll"]:  # PCA's: no importance samples
            cells["nll_k"] = "exact"
        if "latent_top_dim" in row:  # a hierarchy's z counts every group; these statistics are of z_1's
            for key in ("active_units", "mutual_information"):
                cells[key] += " (z_1)" if cells[key] else ""
        lines.append("| " + " | ".join(cells.values()) + " |")
    notes = ("\n(density): -log p(x) of a Gaussian likelihood, a density of the values trained on (pixels "
             "scaled to [0, 1]).\n") if any(
        row.get("nll_density") and row.get("nll") is not None for row in rows) else ""
    if len({row["test_binarize_seed"] is None for row in rows if "test_binarize_seed" in row}) > 1:
        notes += ("\nrecon, ELBO and KL are of the test images binarised once (seed 0) in rows of VAEs with a "
                  "Bernoulli likelihood or binarised runs, and of the images as given in the others.\n")
    if any("latent_top_dim" in row for row in rows):
        notes += "\n(z_1): of the top latent group z_1 alone (of `latent_top_dim` variables); z counts all groups.\n"
    return rows, "\n".join(lines) + "\n" + notes


def _cell(value: Any) -> str:
    """A Markdown table cell: a "|" in a run's name split its row into one cell more than the header, "<i>" went
    through as HTML, and "&lt;" as "<" (other Markdown, `*`, `_`, is left: paths have underscores, and rendering
    them plain would put backslashes in every path on the terminal)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("&", "&amp;").replace("<", "&lt;")


def baseline_config(config: RunConfig, model: str, latent_dim: int | None = None, device: str = "cpu") -> RunConfig:
    """The run's configuration with another --model: same data, net and budget, and the latent size given
    (default the run's --latent-dim); settings of a hierarchy (groups, KL balancing, spectral norms) dropped.
    device: where the report runs, not where the run trained (a GPU run's report on a CPU-only machine failed)."""
    train_config = dataclasses.replace(config.train, objective="elbo", k=1, kl_balance=False, spectral_reg=0.0,
                                       device=device)
    # PCA's p(x|z) is Gaussian, whatever its config's --likelihood: its baselines' is too (fixed --sigma), so
    # they train on the data PCA does, which need not lie in [0, 1]
    likelihood = "gaussian" if config.model.model == "pca" else config.model.likelihood
    model_config = dataclasses.replace(config.model, model=model, linear=False, groups=None, likelihood=likelihood,
                                       latent_dim=config.model.latent_dim if latent_dim is None else latent_dim)
    return without_ignored_settings(dataclasses.replace(config, model=model_config, train=train_config))[0]


def compare_baselines(run_dir: str | Path, *, train_missing: bool = True, progress: bool = False,
                      data: Dataset | None = None, model: nn.Module | None = None,
                      device: str = "cpu") -> list[dict[str, Any]]:
    """PCA, AE and VAE at the run's latent size on the same test data: one row of errors per model.

    The run's own model fills its row; the others are trained (once, and on to the run's epochs when it has
    trained further) into RUN/baselines/<model>, with the run's settings, unless train_missing is False (then
    missing rows are left out, and baselines behind the run are shown as they are). A hierarchy's
    latent size is that of all its groups together (its reconstructions use them all), and its own row
    comes last. Above one latent unit per pixel PCA's row has a "note" instead of errors.
    """
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir)
    data = prepare_data(config, data)
    rows = []
    if data.is_text:  # PCA and autoencoders of token ids are not a thing
        return rows
    own = model if model is not None else runs.load(run_dir, device=device)  # (model: the run's, as the report
    # shows it)
    size = latent_size(own, config)
    pixels, examples = math.prod(data.shape), data.train.x.shape[0]
    for name in (*BASELINES, *((config.model.model,) if config.model.model not in BASELINES else ())):
        if name == "pca" and size > min(pixels, examples):  # (so the run is not PCA's either)
            limit = (f"{pixels} components, one per pixel" if pixels <= examples else
                     f"{examples} components, one per training image")
            rows.append({"model": name, "latent_dim": size, "note": f"none: PCA has at most {limit}"})
            continue
        if name == config.model.model:
            source, model = run_dir, own
        else:
            source = run_dir / "baselines" / name
            cached = source.exists()
            try:
                model = _baseline(config, name, size, source, train_missing, progress, data, device)
            except VaelabError as e:  # a cached baseline damaged or edited since: the run's own report still stands
                if not cached:
                    raise
                if not train_missing:
                    continue
                raise ConfigError(f"the {name} baseline cached in {source} could not be used ({e}); delete that "
                                  "folder and the report trains it afresh, or report with --no-baselines") from None
            if model is None:
                continue
        epochs = None if name == "pca" else runs.latest_checkpoint(source).epoch  # (PCA has none)
        rows.append({"model": name, "latent_dim": size, "epochs": epochs, "run": str(source),
                     **reconstruction_error(model, data.test.x)})
    return rows


def _baseline(config: RunConfig, name: str, size: int, source: Path, train_missing: bool, progress: bool,
              data: Dataset, device: str) -> nn.Module | None:
    """The baseline `name` of a run, from RUN/baselines/NAME: trained (or on to the run's epochs) when
    train_missing, else as it is, or None when there is none."""
    resume = runs.has_checkpoint(source)  # a baseline cut off earlier continues (one cut off before its first
    # checkpoint starts again)
    complete = runs.is_complete(source)
    if not complete and not train_missing:
        return None
    # the run trained on since (train --resume --epochs, a longer demo): its baselines follow, as the table
    # compares them at the same budget (PCA has no epochs)
    behind = resume and name != "pca" and runs.load_config(source).train.epochs < config.train.epochs
    if not complete or behind and train_missing:
        if progress:  # else its epoch lines read as the run's own, trained a second time
            print(f"{'continuing' if resume else 'training'} the {name} baseline for the report's table "
                  f"(latent {size}) in {source} (--no-baselines skips it)", file=sys.stderr)
        wanted = baseline_config(config, name, size, device)
        stored = runs.load_config(source) if resume else None
        if stored is not None and stored.data != wanted.data:  # the run's data moved (its config.json pointed at
            dataclasses.replace(stored, data=wanted.data).save(source / "config.json")  # it): its baselines follow
        train(wanted, source, resume=resume, dataset=data, progress=progress)
    return runs.load(source, device=device)
