"""The HTML report of a run: figures, test metrics and the PCA/AE/VAE comparison, in RUN/report.html."""
from __future__ import annotations

import html
import json
import shlex
from pathlib import Path
from typing import Any

import torch

from . import figures, runs, text_views
from .config import RunConfig
from .data import Dataset
from .errors import ConfigError
from .evaluate import compare_baselines, evaluate_run
from .fileio import atomic_write_text
from .models.common import has_prior
from .prepare import EVAL_SEED, prepare_data
from .system import model_device, note, resolve_device

N_RECON = 10
N_SAMPLES = 64
INTERP_PAIRS, INTERP_STEPS = 4, 10
N_TRAVERSE = 8
METRIC_NAMES = {
    "nll": "test NLL, nats (importance-sampled, lower is better)", "nll_stderr": "NLL standard error",
    "nll_bits_per_dim": "NLL, bits per dimension", "nll_k": "importance samples K",
    "ess_mean": "effective sample size (mean)", "ess_fraction": "effective sample size / K",
    "test_binarize_seed": "test set binarised once with seed",
    "test_loss": "test loss (-ELBO for a VAE)", "test_elbo": "test ELBO, nats",
    "test_recon": "reconstruction -log p(x|z)",
    "test_kl": "KL(q(z|x) || p(z))", "active_units": "active units (Cov_x(E_q[z]) > 0.01)",
    "mutual_information": "mutual information I(x; z) >= this, nats (InfoNCE over N test codes; at most log N)",
    "mutual_information_upper": "mutual information I(x; z) <= this, nats (leave-one-out bound or mean KL)",
    "mutual_information_examples": "N, test codes in the I(x; z) bounds",
    "probe_accuracy_latent": "probe accuracy: latent codes",
    "probe_accuracy_pca": "probe accuracy: PCA features of equal size",
    "probe_accuracy_pixels": "probe accuracy: pixels",
    "sse_per_image": "squared error per test image", "mse_per_pixel": "squared error per pixel",
    "nll_per_token": "NLL per token, nats", "perplexity": "perplexity exp(NLL per token)",
    "token_accuracy": "greedy reconstruction: share of tokens right",
    "epoch": "epoch of the weights evaluated", "latent_dim": "latent size", "latent_top_dim": "top group's size",
    "n_test": "test examples", "active_unit_threshold": "active unit threshold",
    "probe_train_examples": "probe trained on this many codes",
}

DENSITY_NAMES = {  # a Gaussian likelihood's NLL (evaluation.json's "nll_density")
    "nll": "test -log p(x), nats: a density of the values trained on (pixels scaled to [0, 1]); Gaussian "
           "likelihood, not comparable with NLLs of discrete data, and below 0 where the density exceeds 1",
}
DEQUANTIZED_NAMES = {  # a Gaussian likelihood trained and scored on dequantised 8-bit pixels (--dequantize)
    "nll": "test -log p(x), nats: a density of the dequantised pixels (k + u)/256",
    "nll_bits_per_dim": "NLL of the 8-bit images, bits per dimension: at most this (-log p(x) + D log 256, "
                        "through dequantisation)",
}
EXACT = "; exact: probabilistic PCA's Gaussian N(mean, W W^T + sigma^2 I)"  # after PCA's "nll" ("nll_exact")
TOP_GROUP_NAMES = {  # a hierarchy's encode() is q(z_1 | x) of its top group: these statistics are of z_1 alone
    "active_units": "active units of the top latent group z_1 (Cov_x(E_q[z_1]) > 0.01)",
    "mutual_information": "mutual information I(x; z_1) of the top group >= this, nats (InfoNCE over N test codes; "
                          "at most log N)",
    "mutual_information_upper": "mutual information I(x; z_1) of the top group <= this, nats (leave-one-out bound "
                                "or mean KL of z_1)",
}
NONE_MEANS = {"mutual_information_upper": "none finite (one test code, and no analytic KL)"}


@torch.no_grad()
def make_figures(run_dir: Path, model: torch.nn.Module, data: Dataset) -> tuple[dict[str, Path], dict[str, str]]:
    """All report pictures of a trained model on its test split, as PNGs in RUN/figures, and what a caption must
    add about this run's pictures (the traversals' dimensions)."""
    out = Path(run_dir) / "figures"
    x = data.test.x
    torch.manual_seed(EVAL_SEED)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    n = x.shape[0]
    pick = torch.randperm(n, generator=gen)
    made: dict[str, Path] = {}
    shown = min(N_RECON, n)  # small test splits (a folder of a few dozen images) show what they have
    recon = figures.reconstructions(model, x[pick[:shown]])
    made["reconstructions"] = figures.save_grid(recon, out / "reconstructions.png", nrow=shown)
    if has_prior(model):
        made["samples"] = figures.save_grid(model.sample(N_SAMPLES), out / "samples.png", nrow=8)
    n_pairs = min(INTERP_PAIRS, n // 2)  # distinct images, after those reconstructed where there are enough
    if n_pairs:
        pairs = pick[(N_RECON + torch.arange(2 * n_pairs)) % n].view(2, -1)
        strip = figures.interpolations(model, x[pairs[0]], x[pairs[1]], steps=INTERP_STEPS)
        made["interpolations"] = figures.save_grid(strip, out / "interpolations.png", nrow=INTERP_STEPS)
    codes = torch.cat([model.embed(x[i:i + 1000].to(model_device(model))).cpu() for i in range(0, len(x), 1000)])
    spread = codes.std(0) if n > 1 else torch.ones(codes.shape[1])  # one code has no spread: the prior's scale
    dims = spread.argsort(descending=True)[:N_TRAVERSE].tolist()  # the dimensions the codes use most
    grid = figures.traversals(model, x[pick[:1]], dims, scale=spread.to(model_device(model)))
    made["traversals"] = figures.save_grid(grid, out / "traversals.png", nrow=grid.shape[0] // len(dims))
    made["latent_map"] = figures.latent_map(codes, data.test.y, out / "latent_map.png", classes=data.classes)
    made.update(_curves(run_dir))
    return made, {"traversals": f" Rows, top to bottom: dimensions {_listing([str(d) for d in dims])} (from 0)."}


def _curves(run_dir: Path) -> dict[str, Path]:
    curves = figures.training_curves(runs.read_metrics(run_dir), Path(run_dir) / "figures" / "training_curves.png")
    return {} if curves is None else {"training_curves": curves}


CAPTIONS = {
    "reconstructions": "Test images (top) and their reconstructions (bottom), decoded from their point codes "
                       "(a VAE's posterior mean, or mean direction for vMF latents; an AE's or PCA's code).",
    "samples": "Samples from the prior: z ~ p(z), shown as the mean of p(x|z).",
    "interpolations": "Interpolations between the encodings of pairs of test images (one pair per row): on the "
                      "line between them, or the great circle for vMF latents.",
    "traversals": "Traversals: one latent dimension per row (the most used first), varied by +-3 standard "
                  "deviations of the test codes around one test image's encoding.",
    "latent_map": "Test point codes (as decoded above) coloured by label; a PCA projection when the latent has "
                  "more than two dimensions, one row per label when it has one.",
    "training_curves": "Loss per epoch on the training and validation sets (left); validation reconstruction "
                       "and KL terms (right).",
    "kl_per_dim": "KL per latent dimension (one value for a vMF latent) on the test set (left) and the variance of "
                  "the posterior means over "
                  "the test set (right): dimensions above 0.01 are active units (Burda et al. 2016).",
    "kl_per_group": "KL(q(z_l | x, z_<l) || p(z_l | z_<l)) per latent group of the hierarchy on the test set, "
                    "top group first.",
}


ALTS = {  # short descriptions of the pictures for screen readers; the captions say more
    "reconstructions": "Grid: test images above their reconstructions",
    "samples": "Grid of 64 images sampled from the prior",
    "interpolations": "Rows of images interpolating between two test images each",
    "traversals": "Rows of images, each varying one latent dimension",
    "latent_map": "Scatter plot of test codes coloured by label",
    "training_curves": "Line plots of the losses per epoch",
    "kl_per_dim": "Bar charts of KL and posterior-mean variance per latent dimension",
    "kl_per_group": "Bar chart of KL per latent group",
}


def _report_device(run_dir: Path, trained_on: str) -> str:
    """The run's own device if this machine has it, else its first GPU for a run trained on one (cuda:1 on a
    one-GPU machine), else the CPU: a GPU run's report on a laptop."""
    try:
        resolve_device(trained_on)
    except ConfigError:
        other = "cuda:0" if trained_on.startswith("cuda") and torch.cuda.is_available() else "cpu"
        note(f"{run_dir} trained on {trained_on}, which this machine lacks: the report runs on "
             f"{'the CPU' if other == 'cpu' else other}")
        return other
    return trained_on


def write_report(run_dir: str | Path, *, baselines: bool = True, progress: bool = False,
                 data: Dataset | None = None, device: str | None = None) -> Path:
    """Evaluate the run, draw its figures and write RUN/report.html; returns the report's path.

    Args:
        run_dir: a trained run directory.
        baselines: train the PCA/AE/VAE runs missing from the comparison table (else leave them out).
        progress: show progress while training baselines.
        data: the run's data set already in memory, to skip loading it again.
        device: where the model runs and the baselines train (auto, cpu, cuda or cuda:N); default the run's own
            device where this machine has it, else the CPU (with a note).
    """
    run_dir = Path(run_dir)
    config = runs.load_config(run_dir)
    device = device or _report_device(run_dir, config.train.device)
    data = prepare_data(config, data)
    # one checkpoint, read and loaded once: a run still training moves on (and prunes that folder) meanwhile, and
    # the page mixed figures, metrics and a status of three epochs
    checkpoint = runs.latest_checkpoint(run_dir)
    model = runs.load(run_dir, checkpoint=checkpoint, device=device)
    metrics = evaluate_run(run_dir, data=data, checkpoint=checkpoint, model=model)
    table = compare_baselines(run_dir, train_missing=baselines, progress=progress, data=data, model=model,
                              device=device)
    if data.is_text:  # sentences instead of pictures
        made, notes = _curves(run_dir), {}
        text = text_views.html_sections(model, data.test.x, data.vocab, seed=EVAL_SEED)
    else:
        (made, notes), text = make_figures(run_dir, model, data), ""
    if metrics.get("kl_per_dim"):
        made["kl_per_dim"] = figures.kl_per_dimension(metrics["kl_per_dim"], metrics.get("posterior_mean_variance"),
                                                      run_dir / "figures" / "kl_per_dim.png")
    if metrics.get("kl_per_group"):
        made["kl_per_group"] = figures.kl_per_dimension(metrics["kl_per_group"], None,
                                                        run_dir / "figures" / "kl_per_group.png", unit="latent group")
    page = _render(config_dict=config.to_dict(), metrics=metrics, table=table, made=made, notes=notes,
                   run_dir=run_dir, text=text, status=_unfinished(run_dir, config, checkpoint))
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path


def _unfinished(run_dir: Path, config: RunConfig, checkpoint: runs.Checkpoint) -> str:
    """A line for a run whose training stopped early (interrupted, or stopped on a non-finite loss) or never
    started (--epochs 0); "" else."""
    if runs.finished(checkpoint, config) and config.train.epochs == 0 and config.model.model != "pca":
        return ("This model is untrained (--epochs 0): the report shows its initial weights (baselines for the "
                "table are untrained too, PCA is fitted). To train it: vaelab train --resume --epochs N "
                f"--out {shlex.quote(str(run_dir))}")
    if runs.finished(checkpoint, config):
        return ""
    return (f"Training stopped after epoch {checkpoint.epoch} of {config.train.epochs}: this report shows that "
            f"checkpoint (baselines for the table train for all {config.train.epochs}). To continue it: "
            f"vaelab train --resume --out {shlex.quote(str(run_dir))} (with a lower --lr X if it stopped on a NaN "
            "or infinite loss, which the same rate would meet again)")


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], caption: str) -> str:
    head = "".join(f'<th scope="col">{html.escape(label)}</th>' for _, label in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(key)))}</td>" for key, _ in columns) + "</tr>"
        for row in rows
    )
    return (f'<div class="wide"><table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _listing(names: list[str]) -> str:
    """The names joined as in "A, B and C"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 else f"{value:.2f}"
    return "" if value is None else str(value)


def _render(*, config_dict: dict, metrics: dict, table: list[dict], made: dict[str, Path], run_dir: Path,
            notes: dict[str, str] | None = None, text: str = "", status: str = "") -> str:
    settings = [{"setting": f"{section}.{k}", "value": json.dumps(v, ensure_ascii=False)}
                for section in ("data", "model", "train") for k, v in config_dict[section].items()]
    names = {**METRIC_NAMES, **(DENSITY_NAMES if metrics.get("nll_density") else {}),
             **(DEQUANTIZED_NAMES if metrics.get("nll_dequantized") else {}),
             **(TOP_GROUP_NAMES if metrics.get("kl_per_group") else {})}
    if metrics.get("nll_exact"):
        names["nll"] += EXACT
    metric_rows = [{"metric": names.get(k, k), "value": NONE_MEANS.get(k) if v is None else v}
                   for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) or v is None and k in NONE_MEANS]
    pictures = "".join(
        f'<figure><img src="{html.escape(str(path.relative_to(run_dir)))}" alt="{html.escape(ALTS[name])}">'
        f"<figcaption>{html.escape(CAPTIONS[name] + (notes or {}).get(name, ''))}</figcaption></figure>"
        for name, path in made.items()
    )
    comparison = "" if not table else (
        f"<h2>{html.escape(_listing([row['model'].upper() for row in table]))} at the same latent size</h2>"
        "<p>Reconstruction error on the test set (mean "
        "reconstruction from the code or posterior mean).</p>"
        + _table(table, [("model", "model"), ("latent_dim", "latent size"), ("epochs", "epochs"),
                         ("sse_per_image", "squared error per test image"), ("mse_per_pixel", "MSE per pixel")]
                 + [("note", "note")] * any("note" in row for row in table), "Reconstruction error by model"))
    title = f"vaelab report: {config_dict['model']['model']} on {config_dict['data']['name']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1000px; color: #222; }}
.wide {{ overflow-x: auto; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
caption {{ text-align: left; font-weight: bold; padding-bottom: 0.3em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; image-rendering: pixelated; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body><main>
<h1>{html.escape(title)}</h1>
{f'<p><strong>{html.escape(status)}</strong></p>' if status else ""}
<h2>Test metrics</h2>
{_table(metric_rows, [("metric", "metric"), ("value", "value")], "Metrics on the test set")}
{comparison}
{text}
<h2>Figures</h2>
{pictures}
<h2>Settings</h2>
{_table(settings, [("setting", "setting"), ("value", "value")], "The run's config.json")}
</main></body></html>
"""

