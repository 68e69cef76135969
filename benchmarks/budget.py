"""Train a run for a fixed CPU-time budget: whole epochs, stopping before one would overrun it.

CPU time (time.process_time, all of the process's threads) rather than wall time, so a budget of
"one hour on 2 cores" is 120 CPU minutes whatever else the shared machine is doing. The run is
extended one epoch at a time with --resume, so the schedule (KL warm-up in absolute epochs) and the
result are those of one uninterrupted run of the same number of epochs.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vaelab import runs
from vaelab.config import RunConfig
from vaelab.data import Dataset
from vaelab.schedules import cosine_rate
from vaelab.train import train


def best_dir(out: Path) -> Path:
    """Where the checkpoint with the best validation loss is kept, beside the run."""
    return out.with_name(out.name + "-best")


def keep_best(out: Path, best: Path) -> None:
    """Copy the run in `out` (config and its latest checkpoint) to `best`, replacing it in one rename."""
    latest = runs.latest_checkpoint(out)
    best.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=best.parent, prefix=f".{best.name}.", suffix=".partial"))
    shutil.copy2(out / "config.json", tmp / "config.json")
    shutil.copytree(latest.path, tmp / runs.CHECKPOINTS / latest.path.name)
    shutil.copy2(latest.path.parent / runs.LATEST, tmp / runs.CHECKPOINTS / runs.LATEST)
    old = best.with_name(f".{best.name}.old")
    if best.exists():
        best.rename(old)
    tmp.rename(best)
    shutil.rmtree(old, ignore_errors=True)


def cosine_lr(lr_max: float, lr_min: float, total_s: float, spent_s: float = 0.0) -> Callable[[float], float]:
    """The trainer's --lr-schedule cosine over a CPU budget instead of epochs (Loshchilov & Hutter 2017, eq. 5).

    Returns lr(used_s) = lr_min + (lr_max - lr_min) (1 + cos(pi t / T)) / 2 with t = spent_s + used_s, the CPU
    seconds of the run so far (spent_s: before a --resume), and T = total_s; held at lr_min once t >= T.
    One rate per epoch: train_within passes it to the trainer as --lr when it resumes for the next epoch.
    """
    return lambda used_s: cosine_rate(lr_max, lr_min, (spent_s + used_s) / total_s)


def train_within(config: RunConfig, out: Path, *, cpu_s: float, dataset: Dataset,
                 resume: bool = False, best: Path | None = None,
                 lr_at: Callable[[float], float] | None = None) -> dict[str, float]:
    """Train epochs until the next one would pass cpu_s; returns epochs, cpu_s and wall_s spent here.

    With `best`, the checkpoint with the lowest validation loss so far is kept there as a loadable run
    (early stopping on validation, the published protocol); `best_epoch` and `best_val_loss` are returned.
    lr_at(used_s), e.g. cosine_lr(..), sets the rate of each epoch from the CPU seconds used before it
    (the trainer's --resume takes a new --lr); without it every epoch runs at config.train.lr.
    """
    cpu0, wall0 = time.process_time(), time.perf_counter()
    done = runs.latest_checkpoint(out).epoch if resume and (out / "config.json").exists() else 0
    if done == 0 and not (out / "config.json").exists():
        train(dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=0)), out,
              dataset=dataset, progress=False)
    last = 0.0
    best_record = min(runs.read_metrics(out), key=lambda r: r["val_loss"], default=None)
    best_val, best_epoch = (best_record["val_loss"], best_record["epoch"]) if best_record else (float("inf"), 0)
    while True:
        used = time.process_time() - cpu0
        if cpu_s <= 0 or used + 1.1 * last > cpu_s:  # (a budget already spent trains nothing)
            break
        start = time.process_time()
        done += 1
        lr = config.train.lr if lr_at is None else lr_at(used)
        train(dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=done, lr=lr)), out,
              resume=True, dataset=dataset, progress=False)
        last = time.process_time() - start
        record = runs.read_metrics(out)[-1]
        if best is not None and record["val_loss"] < best_val:
            best_val, best_epoch = record["val_loss"], done
            keep_best(out, best)
        print(f"epoch {done}: val {record['val_loss']:.2f} (kl {record['val_kl']:.2f}), lr {lr:.2g}, "
              f"{last / 60:.2f} CPU min, {used / 60 + last / 60:.1f} of {cpu_s / 60:.1f}", flush=True)
    return {"epochs": done, "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
            "best_epoch": best_epoch, "best_val_loss": best_val}


def train_then_finetune(config: RunConfig, out: Path, *, cpu_s: float, finetune_s: float, finetune_lr: float | None,
                        dataset: Dataset, resume: bool = False, best: Path | None = None,
                        lr_at: Callable[[float], float] | None = None) -> dict[str, float]:
    """train_within for cpu_s at the configured rate, then the same run resumed at finetune_lr for finetune_s.

    The lower rate lowers Adam's noise floor once the validation ELBO has stalled (a nat or more for the
    MLP VAE on Fashion-MNIST). Returns train_within's dict over both phases, with finetune_from_epoch.
    A negative cpu_s (a resumed run already past the first phase's share) comes out of finetune_s, so the
    two phases together never exceed cpu_s + finetune_s. lr_at schedules the first phase (see train_within).
    """
    spent = train_within(config, out, cpu_s=cpu_s, dataset=dataset, resume=resume, best=best, lr_at=lr_at)
    start = runs.latest_checkpoint(out).epoch
    finetune_s += min(0.0, cpu_s)
    if finetune_s <= 0 or not finetune_lr:
        return {**spent, "finetune_from_epoch": None}
    low = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=finetune_lr))
    tuned = train_within(low, out, cpu_s=finetune_s, dataset=dataset, resume=True, best=best)
    return {**tuned, "cpu_s": spent["cpu_s"] + tuned["cpu_s"], "wall_s": spent["wall_s"] + tuned["wall_s"],
            "finetune_from_epoch": start}
