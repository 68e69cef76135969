"""One HVAE training step in fp32 eager (the reference) against bf16 autocast, torch.compile and NCHW weights.

The model is --preset hvae-s (or --hidden/--groups) on random binary 28x28 images, batch 100, the
trainer's loss (ELBO with KL balancing at beta 0.5) and fused Adam, on --threads threads. Rounds of
--steps steps alternate between the variants, each with its own copy of the model and optimiser; the
median time per step and its ratio to fp32 eager are printed. This is where the README's reasons for
training the hierarchy without mixed precision or torch.compile on a CPU come from. The model keeps its
weights channels-last (models/hvae.py); "NCHW weights" is the same step with them in torch's default layout.

    OMP_NUM_THREADS=1 python benchmarks/hvae_step.py [--threads 1] [--rounds 5] [--steps 10] [--no-compile]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch
from hvae_fashion_mnist import hvae_config

from vaelab.flags import group_counts, positive_ints
from vaelab.models import build_model
from vaelab.steps import objective_for
from vaelab.system import flush_denormals


def timed_rounds(variants: dict, times: dict, args: argparse.Namespace) -> None:
    """Each variant's seconds per step, --rounds times, interleaved."""
    for _ in range(args.rounds):
        for name, step in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hidden", type=positive_ints, default=None)
    parser.add_argument("--groups", type=group_counts, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its warm-up takes ~40 s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = hvae_config(groups=args.groups, hidden=args.hidden)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, input_shape=(1, 28, 28)))
    loss_terms = objective_for(config)
    torch.manual_seed(0)
    base = build_model(config.model)
    x = (torch.rand(100, 1, 28, 28) < 0.3).float()

    def variant(bf16: bool = False, compiled: bool = False, layout: torch.memory_format = torch.channels_last):
        model = copy.deepcopy(base).to(memory_format=layout)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

        def loss(xb):
            return loss_terms(model, xb, beta=0.5, free_bits=0.0, kl_balance=True)["loss"].mean()

        forward = torch.compile(loss, dynamic=False) if compiled else loss

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                value = forward(x)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        return step

    variants = {"fp32 eager (reference)": variant(), "bf16 autocast": variant(bf16=True),
                "NCHW weights": variant(layout=torch.contiguous_format)}
    if not args.no_compile:
        variants["torch.compile"] = variant(compiled=True)
    for step in variants.values():  # warm-up (and compilation)
        for _ in range(3):
            step()
    times = {name: [] for name in variants}
    with flush_denormals():  # as the trainer steps (denormal gradients slow an Intel CPU's steps 2-3x)
        timed_rounds(variants, times, args)
    reference = statistics.median(times["fp32 eager (reference)"])
    print(f"HVAE {config.model.hidden} groups {config.model.groups}, batch 100, {args.threads} thread(s)")
    print(f"{'variant':<24}{'ms per step':>12}{'vs fp32 eager':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<24}{1000 * median:>12.1f}{reference / median:>14.2f}x")


if __name__ == "__main__":
    main()
