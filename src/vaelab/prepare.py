"""A run's data as its model needs it: loaded by name (checked against the fingerprint a run recorded), then
binarised or dequantised, with its values checked for the likelihood. Training, evaluation, reports and the
explorer all take their data from here."""
from __future__ import annotations

import dataclasses

from .config import TEXT_MODELS, DataConfig, RunConfig
from .data import (
    Dataset,
    check_eight_bit,
    check_finite,
    check_unit_interval,
    dequantize_held_out,
    fingerprint,
    load_dataset,
    static_binarize,
)
from .errors import ConfigError, DataError

EVAL_SEED = 0  # validation/test sets are binarised once, and evaluation noise drawn, with this seed


def prepare_data(config: RunConfig, dataset: Dataset | None = None) -> Dataset:
    """Load the run's data set and apply its binarisation or dequantisation; checks values for the chosen
    likelihood. Data this returned comes back as it is for the same settings (the report passes its data on to
    evaluation, baselines and training), and is refused for others."""
    if dataset is not None and DataConfig(name=dataset.name).name != config.data.name:  # (names normalised alike)
        raise ConfigError(f"the data set given is {dataset.name!r} but the config's data is {config.data.name!r}, "
                          "which the run records and later commands load; give DataConfig(name="
                          f"{dataset.name!r}), or that data set")
    try:
        ds = dataset if dataset is not None else load_dataset(config.data.name)
    except DataError as e:
        if config.data.fingerprint is None:  # a new run's data: the message's fix is the user's flag
            raise
        raise DataError(f"{e} (a run's data: put it back where it trained, or point data.name in the run's "
                        "config.json at where it is now)") from None
    if config.data.fingerprint is not None and ds.prepared_as is None:
        check_unchanged(ds.name, fingerprint(ds), config.data.fingerprint)
    mode = config.data.binarize
    needs_unit = not config.data.dequantize and (config.model.bernoulli or mode != "none")
    key = (mode, config.data.dequantize, config.train.seed if mode == "static" else None, needs_unit)
    if ds.prepared_as is not None and ds.prepared_as[:3] == key[:3]:
        if needs_unit and not ds.prepared_as[3]:  # prepared for PCA, say, and now for a Bernoulli baseline
            _check_values(ds, config, needs_unit)
            return dataclasses.replace(ds, prepared_as=key)
        return ds  # (checked for [0, 1] is also checked for finite values)
    if ds.prepared_as is not None:
        binarized, dequantized, seed, _ = ds.prepared_as
        raise ConfigError(f"data set {ds.name!r} was prepared for another run (--binarize {binarized}"
                          + (" --dequantize" if dequantized else "") + (f" --seed {seed}" if seed is not None else "")
                          + "); pass the data set as loaded (vaelab.data.load_dataset)")
    ds = dataclasses.replace(ds, prepared_as=key)
    text_model = config.model.model in TEXT_MODELS
    if ds.is_text != text_model:
        wanted = "a text data set such as fortunes" if text_model else "an image data set such as mnist5k"
        raise ConfigError(f"--model {config.model.model} needs {wanted}, but {ds.name!r} holds "
                          f"{'text' if ds.is_text else 'images'}")
    if ds.is_text:
        if mode != "none":
            raise ConfigError(f"--binarize {mode} applies to images; {ds.name!r} is text (drop --binarize)")
        return ds
    _check_values(ds, config, needs_unit)
    if config.data.dequantize:  # (not with --binarize: RunConfig refuses the pair)
        return dequantize_held_out(ds, EVAL_SEED)
    if mode == "none":
        return ds
    held_out = static_binarize(ds, EVAL_SEED)  # val/test fixed once for comparable numbers
    train = static_binarize(ds, config.train.seed).train if mode == "static" else ds.train
    return dataclasses.replace(held_out, train=train)


def check_unchanged(name: str, now: str, recorded: str) -> None:
    """Refuse data read from files that differ from what the run trained on (sizes, or contents: reordered or
    added rows move images between the fixed splits, so a test set could hold training images)."""
    if now != recorded:
        sizes = ("the same sizes, other contents" if now.split(":")[0] == recorded.split(":")[0] else
                 f"{recorded.split(':')[0]} train/val/test examples then, {now.split(':')[0]} now")
        raise DataError(f"{name} has changed since the run trained on it ({sizes}): the files, or how this version "
                        "of vaelab reads them (README, Data); put back the data it trained on, or train a new run on "
                        "this data")


def _check_values(ds: Dataset, config: RunConfig, needs_unit: bool) -> None:
    """Each split's values as the run's likelihood and binarisation need them, or a one-line DataError."""
    for split_name in ("train", "val", "test"):
        x = getattr(ds, split_name).x
        source = f"data set {ds.name!r} ({split_name} split)"
        if config.data.dequantize:
            check_eight_bit(x, source)
        elif needs_unit:
            why = "binarisation" if config.data.binarize != "none" else "--likelihood bernoulli"
            check_unit_interval(x, f"{source}, as {why} needs values in [0, 1]")
        else:
            check_finite(x, source)
