"""Training steps with and without flushing denormals, in one run: how the step time grows as the model converges.

The MLP VAE of train_speed.py (784-512-256 -> 16, Bernoulli, fused Adam, batch 128) trains on
Fashion-MNIST (mnist5k when it is missing) for --steps steps twice, each in a fresh process: once in
vaelab.system.flush_denormals (as the trainer runs), once without (as plain PyTorch runs). Prints the
median step time of each block of --block steps for both, and their ratio. Denormals appear after a few
hundred steps (sigmoid gradients of confident pixels, Adam moments of dead units); on Intel CPUs each costs
a microcode assist, so the unflushed run slows down and the flushed one does not.

    python benchmarks/denormals.py [--steps 1500] [--block 150]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time

import torch

from vaelab.data import load_dataset
from vaelab.errors import DataError
from vaelab.models import VAE
from vaelab.objectives import elbo
from vaelab.steps import make_optimizer, optimizer_step
from vaelab.system import flush_denormals, keep_freed_memory

BATCH = 128


def block_times(flush: bool, steps: int, block: int) -> list[float]:
    """Median ms per step of each block of `block` steps, training from a fixed seed."""
    try:
        x = load_dataset("fashion-mnist").train.x
    except DataError:
        x = load_dataset("mnist5k").train.x
    keep_freed_memory()
    torch.manual_seed(0)
    model = VAE(input_shape=tuple(x.shape[1:]), latent_dim=16, hidden=(512, 256))
    optimizer = make_optimizer(model, 1e-3)
    times, out = [], []
    with flush_denormals() if flush else contextlib.nullcontext():
        for i in range(steps):
            start = time.perf_counter()
            xb = torch.index_select(x, 0, torch.randint(0, len(x), (BATCH,)))
            loss = elbo(model(xb), xb)["loss"].mean()
            for p in model.parameters():
                p.grad = None
            loss.backward()
            optimizer_step(optimizer)
            times.append(time.perf_counter() - start)
            if (i + 1) % block == 0:
                out.append(1e3 * statistics.median(times))
                times = []
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--block", type=int, default=150)
    parser.add_argument("--measure", choices=("flushed", "plain"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(" ".join(f"{t:.3f}" for t in block_times(args.measure == "flushed", args.steps, args.block)))
        return
    runs = {}
    for name in ("plain", "flushed"):  # each in a fresh process: thread-pool flags are process state
        done = subprocess.run([sys.executable, __file__, "--measure", name, "--steps", str(args.steps),
                               "--block", str(args.block)], capture_output=True, text=True, check=True)
        runs[name] = [float(t) for t in done.stdout.split()]
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; median ms per step in each block")
    print(f"{'steps':>12}{'plain':>10}{'flushed':>10}{'plain/flushed':>15}")
    for j, (plain, flushed) in enumerate(zip(runs["plain"], runs["flushed"])):
        steps = f"{j * args.block + 1}-{(j + 1) * args.block}"
        print(f"{steps:>12}{plain:>10.2f}{flushed:>10.2f}{plain / flushed:>14.2f}x")
    last = len(runs["plain"]) // 3 or 1  # the last third, once the model has converged somewhat
    ratio = statistics.median(runs["plain"][-last:]) / statistics.median(runs["flushed"][-last:])
    print(f"slowdown_without_flushing={ratio:.2f}")


if __name__ == "__main__":
    main()
