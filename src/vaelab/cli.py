"""The command line: `vaelab train | evaluate | sample | reconstruct | interpolate | report | demo`.

Flags of `train` map one to one onto RunConfig fields (FLAGS below).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    ACTIVATIONS,
    BINARIZE,
    DEVICES,
    LATENT_FAMILIES,
    LIKELIHOODS,
    LR_SCHEDULES,
    MODELS,
    NETS,
    OBJECTIVES,
    RunConfig,
)
from .errors import ConfigError, VaelabError, is_out_of_memory


def positive_ints(text: str, minimum: int = 1) -> tuple[int, ...]:
    """argparse type for comma-separated integers >= minimum, positive by default (--hidden; the benchmarks'
    flags); group_counts passes 0."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < minimum:
        kind = "positive integers like 512,256" if minimum == 1 else f"integers >= {minimum} like 4,4,0"
        raise argparse.ArgumentTypeError(f"expects comma-separated {kind}, got {text!r}")
    return sizes


def group_counts(text: str) -> tuple[int, ...]:
    """argparse type for --groups: latent groups per scale, coarsest first; the finest scales may have 0."""
    return positive_ints(text, minimum=0)


# (section, field, flag, argparse keyword arguments)
FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("data", "name", "--data", dict(metavar="NAME", help="mnist5k (default), digits, fashion-mnist, mnist, "
                                                         "folder:PATH, npz:PATH or npy:PATH")),
    ("data", "binarize", "--binarize", dict(choices=BINARIZE, help="binarise pixels for a Bernoulli likelihood: "
                                                                  "resampled every batch (dynamic) or once (static)")),
    ("data", "dequantize", "--dequantize", dict(action="store_const", const=True, help="8-bit pixels k/255 as "
                                                "(k + u)/256, u ~ U[0, 1) drawn every batch, for a Gaussian "
                                                "likelihood: its NLL then bounds the 8-bit images' (bits/dim)")),
    ("model", "model", "--model", dict(choices=MODELS, help="pca (closed form), ae, vae (default), hvae "
                                                           "(hierarchical, NVAE-style) or text-vae "
                                                           "(sentence VAE, for --data fortunes)")),
    ("model", "likelihood", "--likelihood", dict(choices=LIKELIHOODS, help="p(x|z) (default bernoulli)")),
    ("model", "latent_dim", "--latent-dim", dict(type=int, metavar="N", help="size of z (default 16)")),
    ("model", "net", "--net", dict(choices=NETS, help="encoder/decoder bodies: mlp (default) or conv; lstm "
                                                     "(default) or gru for text")),
    ("model", "hidden", "--hidden", dict(type=positive_ints, metavar="512,256",
                                         help="layer widths (mlp, default 512,256) or channels (conv, default 32,64)")),
    ("model", "sigma", "--sigma", dict(type=float, metavar="X", help="Gaussian likelihood scale, fixed (or initial "
                                                                     "for gaussian-learned); default 0.1")),
    ("model", "activation", "--activation", dict(choices=ACTIVATIONS, help="MLP units: relu (default) or gated "
                                                                           "linear units (as in VampPrior)")),
    ("model", "linear", "--linear", dict(action="store_const", const=True, help="no nonlinearities (linear AE/VAE)")),
    ("model", "embedding_dim", "--embedding-dim", dict(type=int, metavar="N", help="text: token embedding size "
                                                                                   "(default 128)")),
    ("model", "word_dropout", "--word-dropout", dict(type=float, metavar="P", help="text: share of decoder inputs "
                                                                                  "replaced by <unk> in training "
                                                                                  "(Bowman et al. 2016)")),
    ("model", "latent", "--latent", dict(choices=LATENT_FAMILIES, help="gaussian (default) or vmf: von Mises-Fisher "
                                                                       "on the sphere (Davidson et al. 2018)")),
    ("model", "kappa", "--kappa", dict(type=float, metavar="K", help="fixed vMF concentration (default: learned)")),
    ("model", "bn_mu", "--bn-mu", dict(type=float, metavar="GAMMA", help="BN-VAE: batch-normalise posterior means "
                                                                         "with fixed scale GAMMA (Zhu et al. 2020)")),
    ("model", "groups", "--groups", dict(type=group_counts, metavar="2,2", help="hvae: latent groups per scale, top "
                                                                       "(coarsest) first; default 2 per scale; 0 "
                                                                       "for the finest scales: cells, no latents")),
    ("model", "cells", "--cells", dict(type=int, metavar="N", help="hvae: residual cells per group (default 1)")),
    ("model", "scale_floor", "--scale-floor", dict(type=float, metavar="X", help="hvae: every latent standard "
                                                                                 "deviation is softplus(.) + X "
                                                                                 "(default 0.01, as NVAE)")),
    ("train", "epochs", "--epochs", dict(type=int, metavar="N", help="passes over the training set (default 20)")),
    ("train", "batch_size", "--batch-size", dict(type=int, metavar="N", help="default 128")),
    ("train", "lr", "--lr", dict(type=float, metavar="X", help="Adam learning rate (default 1e-3)")),
    ("train", "lr_schedule", "--lr-schedule", dict(choices=LR_SCHEDULES, help="constant (default), or cosine: "
                                                                            "from --lr to --lr-min over --epochs, "
                                                                            "each step (Loshchilov & Hutter 2017)")),
    ("train", "lr_min", "--lr-min", dict(type=float, metavar="X", help="where --lr-schedule cosine ends "
                                                                       "(default 0)")),
    ("train", "beta", "--beta", dict(type=float, metavar="X", help="KL weight (default 1; beta-VAE when != 1)")),
    ("train", "warmup_epochs", "--warmup-epochs", dict(type=float, metavar="N",
                                                       help="linear KL warm-up from 0 to beta over N epochs")),
    ("train", "kl_cycles", "--kl-cycles", dict(type=int, metavar="N", help="cyclical KL annealing with N cycles "
                                                                          "(Fu et al. 2019)")),
    ("train", "kl_cycle_ratio", "--kl-cycle-ratio", dict(type=float, metavar="R",
                                                         help="share of each cycle spent rising (default 0.5)")),
    ("train", "free_bits", "--free-bits", dict(type=float, metavar="LAMBDA", help="free bits: each latent unit's "
                                                                                  "KL counts at least LAMBDA nats "
                                                                                  "(Kingma et al. 2016)")),
    ("train", "objective", "--objective", dict(choices=OBJECTIVES, help="elbo (default) or iwae, the "
                                                                      "K-sample bound of Burda et al. 2016")),
    ("train", "k", "--k", dict(type=int, metavar="K", help="importance samples per example for --objective iwae "
                                                         "(an averaged K-sample ELBO for elbo); default 1")),
    ("train", "grad_clip", "--grad-clip", dict(type=float, metavar="X", help="clip the gradients' global norm "
                                                                            "to X (default: no clipping)")),
    ("train", "kl_balance", "--kl-balance", dict(action="store_const", const=True,
                                                 help="hvae: NVAE's KL balancing across groups during KL "
                                                      "warm-up (Vahdat & Kautz 2020, App. A)")),
    ("train", "spectral_reg", "--spectral-reg", dict(type=float, metavar="LAMBDA",
                                                     help="hvae: add LAMBDA * sum of the weights' largest singular "
                                                          "values, by power iteration (NVAE Sec. 3.3.2)")),
    ("train", "compile", "--compile", dict(action="store_const", const=True,
                                           help="compile each training step's forward pass and loss with "
                                                "torch.compile: 5-15%% faster steps on a CPU after a warm-up "
                                                "of 10-40 s (needs a C++ compiler)")),
    ("train", "sync_bn", "--no-sync-bn", dict(action="store_const", const=False,
                                              help="under torchrun, batch-norm layers use each process's own "
                                                   "batch statistics instead of the global batch's (fewer "
                                                   "exchanges; the run then depends on the process count)")),
    ("train", "seed", "--seed", dict(type=int, metavar="N", help="random seed (default 0)")),
    ("train", "device", "--device", dict(choices=DEVICES, help="auto (cuda if available), cpu or cuda")),
]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# --preset NAME: a starting configuration that the other flags then change
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # a small NVAE-style hierarchy for 28x28 images that trains on a 2-core CPU: as in NVAE, the latents sit at
    # coarse scales (four groups of 8 channels at 4x4, four at 7x7) with cells without latents at 14x14 on each
    # side; one residual cell per group; KL warm-up with balancing. Chosen at 70 CPU minutes on Fashion-MNIST
    # (benchmarks/hvae_fashion_mnist.py): this layout beat latents at 14x14 and 7x7 by ~2.3 nats of validation
    # bound, and (5,5,0) tied it; spectral regularisation (--spectral-reg) made no difference at (3,3) and costs ~7%
    # per step, so it is off
    "hvae-s": {"model": {"model": "hvae", "net": "conv", "hidden": (16, 32, 64), "groups": (4, 4, 0),
                         "latent_dim": 8, "cells": 1},
               "train": {"batch_size": 100, "warmup_epochs": 5, "kl_balance": True}},
}


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The RunConfig the flags describe: `base` (or the defaults, or --preset) with every given flag applied."""
    preset = getattr(args, "preset", None)
    if base is None and preset is not None:
        base = RunConfig.from_dict({name: {**dataclasses.asdict(getattr(RunConfig(), name)), **values}
                                    for name, values in PRESETS[preset].items()}, f"--preset {preset}")
    base = base or RunConfig()
    sections = {name: {} for name in ("data", "model", "train")}
    for section, field, flag, _ in FLAGS:
        value = getattr(args, _dest(flag), None)
        if value is not None:
            sections[section][field] = value
    given = [(section, field, flag) for section, field, flag, _ in FLAGS if field in sections[section]]
    changes = sections["model"]
    if "model" in changes and "net" not in changes:
        changes["net"] = None  # the new model's default body (mlp for images, lstm for text)
    if "net" in changes and "hidden" not in changes:
        changes["hidden"] = None  # the new net's default widths
    config = RunConfig(**{name: dataclasses.replace(getattr(base, name), **changes)
                          for name, changes in sections.items()})
    _refuse_ignored(given, config)
    return config


# train flags of a latent posterior's objective, which autoencoders and PCA do not have; PCA has no optimiser
POSTERIOR_FLAGS = ("--beta", "--warmup-epochs", "--kl-cycles", "--kl-cycle-ratio", "--free-bits", "--objective", "--k")
OPTIMISER_FLAGS = ("--lr", "--lr-schedule", "--lr-min", "--grad-clip")
WHY_IGNORED = {"ae": "--model ae has a deterministic code: no posterior, prior or KL term",
               "pca": "--model pca is fitted in closed form by SVD: no network, optimiser, likelihood choice or KL"}


def _refuse_ignored(given: list[tuple[str, str, str]], config: RunConfig) -> None:
    """One line naming the given flags that would have no effect (README: flags that would be ignored are refused).

    A model flag counts when the model's class takes no such argument (build_model drops those); --net is
    checked by ModelConfig, except for PCA, which has no net. Some flags only act beside another setting.
    """
    from .models import MODELS as CLASSES

    def users(field: str) -> list[str]:
        return [name for name, cls in CLASSES.items() if field in inspect.signature(cls).parameters]

    model, why = config.model.model, {}
    for section, field, flag in given:
        if section == "model" and field not in ("model", "net") and model not in users(field):
            vae_setting = model == "ae" and "vae" in users(field)  # the posterior's: --latent, --kappa, --bn-mu
            why[flag] = (WHY_IGNORED[model] if model == "pca" or vae_setting else
                         f"{flag} is for --model {' or '.join(users(field))}")
        elif model in WHY_IGNORED and (flag in POSTERIOR_FLAGS or model == "pca" and
                                       (flag in OPTIMISER_FLAGS or field == "net")):
            why[flag] = WHY_IGNORED[model]
        elif flag == "--sigma" and config.model.likelihood == "bernoulli":
            why[flag] = "--sigma is the scale of --likelihood gaussian or gaussian-learned"
        elif flag == "--kl-cycle-ratio" and not config.train.kl_cycles:
            why[flag] = "--kl-cycle-ratio shapes the cycles of --kl-cycles N"
        elif flag == "--lr-min" and config.train.lr_schedule == "constant":
            why[flag] = "--lr-min is where --lr-schedule cosine ends"
    if why:
        flags = list(why)
        listed = " and ".join([", ".join(flags[:-1]), flags[-1]] if len(flags) > 1 else flags)
        raise ConfigError(f"{listed} would be ignored ({'; '.join(dict.fromkeys(why.values()))}); "
                          f"drop {'them' if len(flags) > 1 else 'it'}")


def _default_out(config: RunConfig) -> Path:
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in f"{config.data.name}-{config.model.model}")
    out, i = Path("runs") / stem, 2
    while out.exists():
        out, i = Path("runs") / f"{stem}-{i}", i + 1
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from . import runs
    from .reports import write_report
    from .train import train

    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN, the run directory to continue")
        config = config_from_args(args, runs.load_config(args.out))
    else:
        config = config_from_args(args)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and args.out is None:  # each process would otherwise pick its own default folder
        raise ConfigError("a torchrun job needs --out DIR, the one run directory all processes share")
    out = _run_folder(args.out or _default_out(config))
    checkpoint = runs.latest_checkpoint(out) if args.resume else None
    done = checkpoint.epoch if checkpoint else 0
    fitted = bool(checkpoint and config.model.model == "pca" and checkpoint.complete)  # closed form: no epochs
    t0 = time.perf_counter()
    if not fitted:
        train(config, out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":  # only rank 0 speaks and writes the report
        return 0
    if fitted:
        print(f"{out} holds a fitted PCA (closed form, no epochs to continue): nothing to train")
    elif args.resume and done >= config.train.epochs:
        print(f"{out} is at epoch {done} already (--epochs {config.train.epochs}): nothing to train; "
              "give a larger --epochs to continue it")
    elif config.train.epochs == 0 and config.model.model != "pca":
        print(f"initialised {config.model.model} on {config.data.name} without training (--epochs 0): {out}")
    else:
        print(f"trained {config.model.model} on {config.data.name} in {time.perf_counter() - t0:.1f} s: {out}")
    if not args.no_report:
        from .distributed import single_process

        with single_process():  # the job's other processes have left: baselines train in this one alone
            report = write_report(out, baselines=not args.no_baselines, progress=not args.quiet)
        print(f"report: {report}")
    return 0


def _run_folder(out: Path) -> Path:
    """--out of train and demo: a folder, made if missing; an existing file there is refused by name."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the run (vaelab creates it)")
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    if args.k is not None and args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    if args.chunk is not None and args.chunk < 1:
        raise ConfigError(f"--chunk must be >= 1 (samples per pass), got {args.chunk}")
    given = [flag for flag, value in (("--k", args.k), ("--chunk", args.chunk)) if value is not None]
    if given and not args.nll:
        raise ConfigError(f"{' and '.join(given)} would be ignored: {'they set' if len(given) > 1 else 'it sets'} "
                          "the importance-sampled NLL; add --nll or drop " + ("them" if len(given) > 1 else "it"))
    result = evaluate_run(args.run, nll_k=(args.k or 5000) if args.nll else None, probe=not args.no_probe,
                          chunk=args.chunk, device=args.device)
    for key, value in result.items():
        if isinstance(value, list):
            value = "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
        print(f"{key:>28}  {value:.4f}" if isinstance(value, float) else f"{key:>28}  {value}")
    print(f"written: {Path(args.run) / 'evaluation.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluate import compare_runs
    from .fileio import atomic_write_text

    out = _output(args.out, Path("compare.md"))
    _, markdown = compare_runs(args.runs)
    print(markdown, end="")
    atomic_write_text(out, markdown)
    print(f"written: {out}")
    return 0


def _run_and_data(run: Path, device: str):
    from . import runs
    from .train import prepare_data

    config = runs.load_config(run)
    return runs.load(run, device=device), prepare_data(config)


def _index(value: int, n: int, flag: str) -> int:
    if not -n <= value < n:
        images = "1 image (0, or -1" if n == 1 else f"{n} images (0..{n - 1}, or -{n}..-1"
        raise ConfigError(f"{flag} {value} is out of range: the test split has {images} counting from the end)")
    return value % n


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from . import figures, runs

    model = runs.load(args.run, device=args.device)
    if not hasattr(model, "sample"):
        kind = runs.load_config(args.run).model.model
        raise ConfigError(f"{args.run} holds a --model {kind} run, which has no prior to sample from; sample from a "
                          "--model vae run")
    if args.n < 1 or args.n > 10_000:
        raise ConfigError(f"--n must be between 1 and 10000, got {args.n}")
    if args.nrow < 1:
        raise ConfigError(f"--nrow must be >= 1 (images per row), got {args.nrow}")
    torch.manual_seed(args.seed)
    vocab = _vocab(args.run)
    if vocab is not None:
        from . import text_views

        return _write_lines(text_views.samples(model, vocab, args.n), _output(args.out, Path(args.run) / "samples.txt"))
    kwargs = {}
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if "temperature" in inspect.signature(model.sample).parameters:
        kwargs["temperature"] = args.temperature
    elif args.temperature != 1:
        raise ConfigError(f"{args.run} holds a {runs.load_config(args.run).model.model} model, whose prior has no "
                          "temperature; drop --temperature (it applies to --model hvae)")
    out = figures.save_grid(model.sample(args.n, **kwargs), _output(args.out, Path(args.run) / "samples.png"),
                            nrow=args.nrow)
    print(f"written: {out}")
    return 0


def _vocab(run: Path) -> tuple[str, ...] | None:
    """The vocabulary of a text run (rebuilt from its data set), None for images."""
    from . import runs
    from .config import TEXT_MODELS
    from .train import prepare_data

    config = runs.load_config(run)
    return prepare_data(config).vocab if config.model.model in TEXT_MODELS else None


def _output(out: Path | None, default: Path) -> Path:
    """--out, or the command's default file in the run directory. A folder is refused (it was a traceback from
    PIL or the text writer), and so is a picture's name without .png (PIL picks the format by extension)."""
    if out is None:
        return default
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / default.name}")
    if default.suffix == ".png" and out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the picture is written as PNG; give a name ending in .png, such as "
                          f"{out.with_suffix('.png')}")
    return out


def _write_lines(lines: list[str], out: Path) -> int:
    from .fileio import atomic_write_text

    print("\n".join(lines))
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"written: {out}")
    return 0


MAX_RECONSTRUCTIONS = 100  # in one row


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from . import figures

    if not 1 <= args.n <= MAX_RECONSTRUCTIONS:
        raise ConfigError(f"--n must be between 1 and {MAX_RECONSTRUCTIONS} (one row of test images above one of "
                          f"their reconstructions), got {args.n}")
    model, data = _run_and_data(args.run, args.device)
    n = min(args.n, data.test.x.shape[0])
    if data.is_text:
        from . import text_views

        pairs = text_views.reconstructions(model, data.test.x[:n], data.vocab)
        lines = [f"{a}\n  -> {b}" for a, b in pairs]
        return _write_lines(lines, _output(args.out, Path(args.run) / "reconstructions.txt"))
    out = figures.save_grid(figures.reconstructions(model, data.test.x[:n]),
                            _output(args.out, Path(args.run) / "reconstructions.png"), nrow=n)
    print(f"written: {out} (originals on top, reconstructions below)")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from . import figures

    model, data = _run_and_data(args.run, args.device)
    n = data.test.x.shape[0]
    a, b = _index(args.a, n, "--a"), _index(args.b, n, "--b")
    if args.steps < 2 or args.steps > 100:
        raise ConfigError(f"--steps must be between 2 and 100, got {args.steps}")
    if data.is_text:
        from . import text_views

        lines = text_views.interpolation(model, data.test.x[a], data.test.x[b], data.vocab, steps=args.steps)
        return _write_lines(lines, _output(args.out, Path(args.run) / f"interpolate-{a}-{b}.txt"))
    strip = figures.interpolations(model, data.test.x[a:a + 1], data.test.x[b:b + 1], steps=args.steps)
    out = figures.save_grid(strip, _output(args.out, Path(args.run) / f"interpolate-{a}-{b}.png"), nrow=args.steps)
    print(f"written: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .reports import write_report

    print(f"report: {write_report(args.run, baselines=not args.no_baselines, progress=not args.quiet)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(_run_folder(Path(args.out)), epochs=args.epochs, progress=not args.quiet)
    print(f"demo report: {report.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="vaelab", description="Variational autoencoders: train, evaluate, "
                                     "sample and explore. Run `vaelab demo` for a first look.")
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model into a run directory and write its report",
                       description="Train PCA, an autoencoder or a VAE; writes config.json, metrics.jsonl, "
                                   "checkpoints/ and report.html into --out.")
    for _, _, flag, kwargs in FLAGS:
        p.add_argument(flag, dest=_dest(flag), default=None, **kwargs)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration (hvae-s: a small "
                                                             "hierarchical VAE for 28x28 images); flags override it")
    p.add_argument("--out", type=Path, metavar="DIR", help="run directory (default runs/<data>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                                                          "(a larger --epochs extends it; --lr changes the rate "
                                                          "from there)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--no-baselines", action="store_true", help="report without training PCA/AE/VAE baselines")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_train)

    def run_command(name: str, help: str, func) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help, description=help)
        q.add_argument("run", type=Path, metavar="RUN", help="a run directory written by `vaelab train`")
        q.add_argument("--device", default="cpu", choices=DEVICES, help="where to run the model (default cpu)")
        q.set_defaults(func=func)
        return q

    q = run_command("evaluate", "the evaluation suite on the test set (ELBO, KL per dimension, active units, "
                                "I(x;z), linear probes, reconstruction error; NLL with --nll); writes "
                                "RUN/evaluation.json", cmd_evaluate)
    q.add_argument("--nll", action="store_true", help="estimate log p(x) by importance sampling (IWAE bound)")
    q.add_argument("--k", type=int, default=None, help="importance samples per test image (default 5000)")
    q.add_argument("--chunk", type=int, default=None, help="samples per pass (memory knob; default 200)")
    q.add_argument("--no-probe", action="store_true", help="skip the logistic-regression probes")
    q = sub.add_parser("compare", help="a table of several evaluated runs, printed and written as Markdown",
                       description="Compare runs by their evaluation.json (runs without one are evaluated).")
    q.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    q.add_argument("--out", type=Path, default=Path("compare.md"), help="Markdown file (default compare.md)")
    q.set_defaults(func=cmd_compare)
    q = run_command("sample", "a grid of samples from the prior, as PNG (sentences, as text, for text models)",
                    cmd_sample)
    q.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    q.add_argument("--nrow", type=int, default=8, help="images per row (default 8)")
    q.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="hvae: scale the priors' standard deviations by T (0 <= T; default 1)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", type=Path, help="PNG path (default RUN/samples.png)")
    q = run_command("reconstruct", "test images and their reconstructions, as PNG", cmd_reconstruct)
    q.add_argument("--n", type=int, default=10, help="number of test images (1-100, default 10)")
    q.add_argument("--out", type=Path, help="PNG path (default RUN/reconstructions.png)")
    q = run_command("interpolate", "decode the line between the codes of two test images, as PNG",
                    cmd_interpolate)
    q.add_argument("--a", type=int, default=0, help="index of the first test image")
    q.add_argument("--b", type=int, default=1, help="index of the second test image")
    q.add_argument("--steps", type=int, default=10, help="images along the line (default 10)")
    q.add_argument("--out", type=Path, help="PNG path (default RUN/interpolate-A-B.png)")
    q = run_command("report", "write RUN/report.html with figures, metrics and the PCA/AE/VAE table", cmd_report)
    q.add_argument("--no-baselines", action="store_true", help="do not train missing baselines for the table")
    q.add_argument("--quiet", action="store_true", help="no progress output")

    q = sub.add_parser("demo", help="train a VAE on the embedded MNIST digits and write its report (~1 min)",
                       description="Train PCA, an AE and a VAE on mnist5k and write the VAE's report.")
    q.add_argument("--out", default="runs/demo", help="folder for the demo runs (default runs/demo)")
    q.add_argument("--epochs", type=int, default=30, help="VAE/AE epochs (default 30)")
    q.add_argument("--quiet", action="store_true", help="no progress output")
    q.set_defaults(func=cmd_demo)

    from .web import add_serve_command  # (FastAPI and uvicorn load only when `serve` runs)

    add_serve_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs a subcommand; vaelab errors and running out of memory become one line on stderr and
    exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VaelabError as e:
        print(f"vaelab: error{_rank()}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaelab: interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130
    except OSError as e:  # a named file the system refused (permissions, a full disk, a file where a folder
        if e.filename is None:  # should be): one line naming it; anything else is a bug to see whole
            raise
        target = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        print(f"vaelab: error{_rank()}: {e.strerror or e}: {target}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        message = out_of_memory_message(e)
        if message is None:
            raise
        print(f"vaelab: error{_rank()}: {message}", file=sys.stderr)
        return 2


def _rank() -> str:
    """The suffix " (rank R)" in a job of several processes, where each prints its own errors; else ""."""
    return f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def out_of_memory_message(e: BaseException) -> str | None:
    """One line for an allocation failure (MemoryError, torch's CPU or CUDA out-of-memory RuntimeError), naming the
    size asked for where the error gives it and the settings that set it; None for any other error."""
    if not is_out_of_memory(e):
        return None
    text = str(e)
    size = re.search(r"[Tt]ried to allocate (\d+ bytes|[\d.]+ [KMGT]i?B)", text)  # CPU: bytes; CUDA: "2.00 GiB"
    amount = "" if size is None else size.group(1)
    amount = f"{int(amount.split()[0]) / 1e9:.1f} GB" if amount.endswith(" bytes") else amount
    asked = f" (an allocation of {amount})" if amount else ""
    return (f"out of memory{asked}: make the model or its batches smaller (--batch-size, --hidden, --latent-dim) "
            "or use a machine or device with more memory; finished checkpoints are intact")


if __name__ == "__main__":
    sys.exit(main())

