"""Samples per second of the trainer with 1 and 2 torchrun processes on this machine, side by side.

Each job trains the MLP VAE 784-512-256 -> 16 (Bernoulli, per-process batch 128) for two epochs on
20,000 Fashion-MNIST images (mnist5k when missing) and reports the second epoch's throughput (all
processes together). With 2 cores, one process uses both through intra-op threads; two processes get
one thread each and exchange gradients over gloo, so on one small machine the comparison shows the
cost of that exchange rather than a speed-up: scaling pays across machines or GPUs.

    python benchmarks/ddp_scaling.py [--examples 20000] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vaelab import runs
from vaelab.data import load_dataset
from vaelab.errors import DataError

RESULTS = Path(__file__).parent / "results" / "ddp_scaling.json"


def npz_data(folder: Path, examples: int) -> str:
    try:
        data = load_dataset("fashion-mnist")
    except DataError:
        data = load_dataset("mnist5k")
    x = (data.train.x[:examples, 0].numpy() * 255).round().astype(np.uint8)
    path = folder / "train.npz"
    np.savez(path, x_train=x, x_test=x[:1000])
    return f"npz:{path}"


def job(nproc: int, data: str, out: Path) -> float:
    threads = max(1, (os.cpu_count() or 2) // nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vaelab", "train", "--data", data, "--hidden", "512,256", "--latent-dim", "16",
           "--batch-size", "128", "--epochs", "2", "--device", "cpu", "--no-report", "--quiet", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return runs.read_metrics(out)[-1]["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    speeds: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        data = npz_data(Path(tmp), args.examples)
        for r in range(args.rounds):
            for nproc in speeds:
                speeds[nproc].append(job(nproc, data, Path(tmp) / f"run-{nproc}-{r}"))
            print(f"round {r + 1}: " + ", ".join(f"{n} process(es) {v[-1]:,.0f}" for n, v in speeds.items()))
    median = {n: statistics.median(v) for n, v in speeds.items()}
    print(f"\n{'processes':<11}{'global batch':>14}{'samples/s':>12}{'vs 1 process':>14}")
    for n, v in median.items():
        print(f"{n:<11}{128 * n:>14}{v:>12,.0f}{v / median[1]:>13.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"examples": args.examples, "rounds": {str(k): v for k, v in speeds.items()},
                                   "median": {str(k): v for k, v in median.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
