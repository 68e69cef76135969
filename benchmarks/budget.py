"""Train a run for a fixed CPU-time budget: whole epochs, stopping before one would overrun it.

CPU time (time.process_time, all of the process's threads) rather than wall time, so a budget of
"one hour on 2 cores" is 120 CPU minutes whatever else the shared machine is doing. The run is
extended one epoch at a time with --resume, so the schedule (KL warm-up in absolute epochs) and the
result are those of one uninterrupted run of the same number of epochs.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from vaelab import runs
from vaelab.config import RunConfig
from vaelab.data import Dataset
from vaelab.train import train


def train_within(config: RunConfig, out: Path, *, cpu_s: float, dataset: Dataset,
                 resume: bool = False) -> dict[str, float]:
    """Train epochs until the next one would pass cpu_s; returns epochs, cpu_s and wall_s spent here."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    done = runs.latest_checkpoint(out).epoch if resume and (out / "config.json").exists() else 0
    if done == 0 and not (out / "config.json").exists():
        train(dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=0)), out,
              dataset=dataset, progress=False)
    last = 0.0
    while True:
        used = time.process_time() - cpu0
        if used + 1.1 * last > cpu_s:
            break
        start = time.process_time()
        done += 1
        train(dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=done)), out,
              resume=True, dataset=dataset, progress=False)
        last = time.process_time() - start
        record = runs.read_metrics(out)[-1]
        print(f"epoch {done}: val {record['val_loss']:.2f} (kl {record['val_kl']:.2f}), "
              f"{last / 60:.2f} CPU min, {used / 60 + last / 60:.1f} of {cpu_s / 60:.0f}", flush=True)
    return {"epochs": done, "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}
