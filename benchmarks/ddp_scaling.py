"""Samples per second of the trainer with 1 and 2 torchrun processes on this machine, side by side.

Each job trains the MLP VAE 784-512-256 -> 16 (Bernoulli, per-process batch 128) for two epochs on
18,000 of 20,000 Fashion-MNIST images (10% held out; mnist5k when missing) and reports the second
epoch's throughput (all processes together). With 2 cores, one process uses both through intra-op
threads; two processes get one thread each and exchange gradients over gloo, so on one small machine
the comparison shows the cost of that exchange rather than a speed-up: scaling pays across machines or
GPUs.

With --batch-norm it measures what synchronised batch norm costs instead: the hvae-s preset (44
batch-norm layers) for one epoch on 3,000 images (--examples) in two processes, with batch-norm statistics over the
global batch (the default) and per process (--no-sync-bn), alternated; and the latency of a small gloo
all-reduce between two processes on this machine, the price of each layer's exchange.

    python benchmarks/ddp_scaling.py [--examples 20000] [--rounds 2] [--batch-norm]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vaelab import runs
from vaelab.data import load_dataset
from vaelab.errors import DataError

RESULTS = Path(__file__).parent / "results" / "ddp_scaling.json"
BN_RESULTS = Path(__file__).parent / "results" / "ddp_batch_norm.json"


def npz_data(folder: Path, examples: int) -> str:
    try:
        data = load_dataset("fashion-mnist")
    except DataError:
        data = load_dataset("mnist5k")
    x = (data.train.x[:examples, 0].numpy() * 255).round().astype(np.uint8)
    path = folder / "train.npz"
    np.savez(path, x_train=x, x_test=x[:1000])
    return f"npz:{path}"


MLP_VAE = ["--hidden", "512,256", "--latent-dim", "16", "--batch-size", "128", "--epochs", "2"]
HVAE_S = ["--preset", "hvae-s", "--epochs", "1"]


def job(nproc: int, data: str, out: Path, model: list[str] = MLP_VAE) -> float:
    """samples/s of the last epoch of a torchrun job with nproc processes."""
    threads = max(1, (os.cpu_count() or 2) // nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vaelab", "train", "--data", data, *model, "--device", "cpu", "--no-report", "--quiet",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return runs.read_metrics(out)[-1]["samples_per_s"]


def _all_reduce_worker(rank: int, init: str, repeats: int, times: list) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    x = torch.ones(3)  # a batch-norm layer's exchange is a few numbers per channel
    for _ in range(20):
        dist.all_reduce(x)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(x)
    if rank == 0:
        times.append((time.perf_counter() - start) / repeats)
    dist.destroy_process_group()


def all_reduce_latency(folder: Path, repeats: int = 500) -> float:
    """Seconds per all-reduce of a 3-float tensor between two gloo processes on this machine."""
    folder.mkdir(parents=True, exist_ok=True)  # the file rendezvous waits out its timeout on a missing folder
    with mp.Manager() as manager:
        times = manager.list()
        mp.spawn(_all_reduce_worker, args=(f"file://{folder / 'rendezvous'}", repeats, times), nprocs=2)
        return times[0]


def batch_norm_cost(args: argparse.Namespace) -> None:
    speeds: dict[str, list[float]] = {"synchronised": [], "per process (--no-sync-bn)": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = npz_data(Path(tmp), args.examples or 3000)
        latency = all_reduce_latency(Path(tmp))
        print(f"gloo all-reduce of 3 floats between 2 processes: {latency * 1e3:.2f} ms")
        for r in range(args.rounds):
            for name, extra in zip(speeds, ([], ["--no-sync-bn"])):
                speeds[name].append(job(2, data, Path(tmp) / f"hvae-{len(extra)}-{r}", [*HVAE_S, *extra]))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in speeds.items()), flush=True)
    median = {n: statistics.median(v) for n, v in speeds.items()}
    print(f"\nhvae-s, 2 processes{'':<12}{'samples/s':>12}")
    for name, v in median.items():
        print(f"{name:<31}{v:>12,.0f}")
    ratio = median["synchronised"] / median["per process (--no-sync-bn)"]
    print(f"synchronised_vs_per_process={ratio:.2f}")
    BN_RESULTS.write_text(json.dumps({"all_reduce_s": latency, "rounds": speeds, "median": median,
                                  "synchronised_vs_per_process": ratio}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=None, help="images (default 20000; 3000 with --batch-norm)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-norm", action="store_true", help="the cost of synchronised batch norm instead")
    args = parser.parse_args()
    if args.batch_norm:
        batch_norm_cost(args)
        return
    speeds: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        data = npz_data(Path(tmp), args.examples or 20000)
        for r in range(args.rounds):
            for nproc in speeds:
                speeds[nproc].append(job(nproc, data, Path(tmp) / f"run-{nproc}-{r}"))
            print(f"round {r + 1}: " + ", ".join(f"{n} process(es) {v[-1]:,.0f}" for n, v in speeds.items()))
    median = {n: statistics.median(v) for n, v in speeds.items()}
    print(f"\n{'processes':<11}{'global batch':>14}{'samples/s':>12}{'vs 1 process':>14}")
    for n, v in median.items():
        print(f"{n:<11}{128 * n:>14}{v:>12,.0f}{v / median[1]:>13.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"examples": args.examples or 20000, "rounds": {str(k): v for k, v in speeds.items()},
                                   "median": {str(k): v for k, v in median.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
