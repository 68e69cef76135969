"""`vaelab train`'s flags: each maps one to one onto a RunConfig field (FLAGS), and config_from_args turns the
flags given into a RunConfig, refusing those the chosen model would ignore."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any

from .config import (
    ACTIVATIONS,
    BINARIZE,
    LATENT_FAMILIES,
    LIKELIHOODS,
    LR_SCHEDULES,
    MODELS,
    NETS,
    OBJECTIVES,
    ModelConfig,
    RunConfig,
    device_name,
)
from .errors import ConfigError


def positive_ints(text: str, minimum: int = 1) -> tuple[int, ...]:
    """argparse type for comma-separated integers >= minimum, positive by default (--hidden; the benchmarks'
    flags); group_counts passes 0."""
    try:  # every part a number: '32,,16' and '32,' are typos, not 32,16 and 32
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < minimum:
        kind = "positive integers like 512,256" if minimum == 1 else f"integers >= {minimum} like 4,4,0"
        raise argparse.ArgumentTypeError(f"expects comma-separated {kind}, got {text!r}")
    return sizes


def device_arg(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda or cuda:N (config.device_name)."""
    try:
        return device_name(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None


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
                                                                                  "(Bowman et al. 2016; default 0)")),
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
                                                       help="linear KL warm-up from 0 to beta over N epochs "
                                                            "(default 0: none)")),
    ("train", "kl_cycles", "--kl-cycles", dict(type=int, metavar="N", help="cyclical KL annealing with N cycles "
                                                                          "(Fu et al. 2019)")),
    ("train", "kl_cycle_ratio", "--kl-cycle-ratio", dict(type=float, metavar="R",
                                                         help="share of each cycle spent rising (default 0.5)")),
    ("train", "free_bits", "--free-bits", dict(type=float, metavar="LAMBDA", help="free bits: each latent unit's "
                                                                                  "KL counts at least LAMBDA nats "
                                                                                  "(Kingma et al. 2016); at most "
                                                                                  "log N for N training examples")),
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
    ("train", "device", "--device", dict(type=device_arg, metavar="{auto,cpu,cuda,cuda:N}",
                                         help="auto (cuda if available), cpu, cuda, or cuda:N for one GPU of "
                                              "several (under torchrun each process takes its own: use cuda)")),
]


def dest(flag: str) -> str:
    """The argparse attribute of a flag: --latent-dim -> latent_dim."""
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
        value = getattr(args, dest(flag), None)
        if value is not None:
            sections[section][field] = value
    given = [(section, field, flag) for section, field, flag, _ in FLAGS if field in sections[section]]
    changes = sections["model"]
    if preset is not None and "model" in changes:
        if changes["model"] != base.model.model:  # its groups, cells... belong to that model
            raise ConfigError(f"--preset {preset} configures a --model {base.model.model}; drop --model "
                              f"{changes['model']}, or the preset")
        del changes["model"]  # the preset's own: its net and widths stay
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


def _changed(config: RunConfig) -> list[tuple[str, str, str]]:
    """(section, field, flag) of the settings that differ from their defaults for the config's model."""
    defaults = RunConfig(model=ModelConfig(model=config.model.model))
    return [(section, field, flag) for section, field, flag, _ in FLAGS
            if getattr(getattr(config, section), field) != getattr(getattr(defaults, section), field)]


def without_ignored_settings(config: RunConfig) -> tuple[RunConfig, str | None]:
    """The config with every setting its model would ignore back at its default, and a line naming them (None if
    there were none). The Python API's counterpart of the CLI's refusal: a config shared by several models (a loop
    over pca, ae and vae; a baseline made from a VAE's config) keeps its data, widths and budget, and the run's
    config.json records what was trained, not an AE's latent="vmf" or beta=4, or PCA's hidden or lr."""
    defaults = RunConfig(model=ModelConfig(model=config.model.model))
    sections = {"data": {}, "model": {}, "train": {}}
    why = _ignored(_changed(config), config)
    for section, field, flag, _ in FLAGS:
        if flag in why:
            sections[section][field] = getattr(getattr(defaults, section), field)
    cleaned = RunConfig(**{name: dataclasses.replace(getattr(config, name), **changes)
                           for name, changes in sections.items()})
    fields = [f"{section}.{field}" for section, field, flag, _ in FLAGS if flag in why]
    return cleaned, (f"{', '.join(fields)} would be ignored ({'; '.join(dict.fromkeys(why.values()))}): "
                     "trained at their defaults, as config.json records" if why else None)


def _refuse_ignored(given: list[tuple[str, str, str]], config: RunConfig) -> None:
    """One line naming the given flags that would have no effect (README: flags that would be ignored are refused;
    the Python API trains without them and warns: without_ignored_settings)."""
    why = _ignored(given, config)
    if why:
        flags = list(why)
        listed = " and ".join([", ".join(flags[:-1]), flags[-1]] if len(flags) > 1 else flags)
        raise ConfigError(f"{listed} would be ignored ({'; '.join(dict.fromkeys(why.values()))}); "
                          f"drop {'them' if len(flags) > 1 else 'it'}")


def _ignored(given: list[tuple[str, str, str]], config: RunConfig) -> dict[str, str]:
    """Of the given (section, field, flag)s, the flags that would have no effect, each with why.

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
        elif flag == "--kl-balance" and not (config.train.warmup_epochs or config.train.kl_cycles or
                                             config.train.beta < 1):
            why[flag] = ("--kl-balance acts while the KL weight is below 1, as --warmup-epochs N, --kl-cycles N "
                         "or a --beta below 1 set it")
    return why
