"""What vaelab's model costs per training step against the same network written with plain tensors.

Both are the MLP VAE 784-512-256 -> 16 -> 256-512-784 (Bernoulli, fused Adam, batch 128) on Fashion-MNIST's
training split (mnist5k when it is missing), trained in one process with the same loop, so only the model
differs: vaelab's (torch.distributions values, clamped log-variances, per-example ELBO terms, the
registered KL against N(0, I)) against pytorch/examples' formulation in plain tensors (one BCE-with-logits
sum, the KL written out). With --compile, the plain model under torch.compile is timed as well.
Rounds of --steps steps alternate between the models; medians after two warm-up rounds. Denormals are
flushed, as the trainer does (without it both slow down after ~600 steps on Intel CPUs).
Both run their matmuls through PyTorch's default library (oneDNN off, so vaelab.linear falls back to
F.linear): this measures what the model's own code costs; benchmarks/train_speed.py measures the lot.

    python benchmarks/model_overhead.py [--rounds 12] [--steps 60] [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from train_speed import BATCH, ExamplesVAE, load

from vaelab.linear import onednn_off
from vaelab.models import VAE
from vaelab.objectives import elbo
from vaelab.system import flush_denormals, keep_freed_memory


class PlainVAE(ExamplesVAE):
    """train_speed's pytorch/examples network, scored from its logits; forward returns the batch-mean negative ELBO."""

    def forward(self, x):
        logits, mu, logvar = self.logits(x)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())  # Kingma & Welling 2014, Appendix B
        return (F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="sum") + kl) / x.shape[0]


class VaelabVAE(nn.Module):
    """vaelab's VAE and ELBO behind the same interface."""

    def __init__(self):
        super().__init__()
        self.model = VAE(input_shape=(1, 28, 28), latent_dim=16, hidden=(512, 256))

    def forward(self, x):
        return elbo(self.model(x), x)["loss"].sum() / x.shape[0]


def steps_per_s(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> float:
    perm = torch.randperm(len(x))
    start = time.perf_counter()
    for i in range(steps):
        xb = torch.index_select(x, 0, perm[i * BATCH:(i + 1) * BATCH])
        loss = model(xb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--compile", action="store_true", help="also time the plain model under torch.compile")
    args = parser.parse_args()
    keep_freed_memory()
    x = load(args.steps * BATCH).train.x
    models = {"plain tensors": PlainVAE, "vaelab": VaelabVAE}
    if args.compile:
        models["plain, torch.compile"] = lambda: torch.compile(PlainVAE(), dynamic=False)
    setups = {}
    for name, make in models.items():
        torch.manual_seed(0)
        model = make()
        setups[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True))
    rates = {name: [] for name in setups}
    with onednn_off(), flush_denormals():  # as the trainer runs: no denormal slowdown after ~600 steps
        for _ in range(args.rounds + 2):  # alternating; the first two rounds are warm-up (and compilation)
            for name, (model, optimizer) in setups.items():
                rates[name].append(steps_per_s(model, optimizer, x, args.steps))
    median = {name: statistics.median(r[2:]) for name, r in rates.items()}
    print(f"{'model':<22}{'samples/s':>11}{'vs plain':>10}   ({args.rounds} rounds of {args.steps} steps, "
          f"{torch.get_num_threads()} threads)")
    for name, rate in median.items():
        print(f"{name:<22}{rate:>11,.0f}{rate / median['plain tensors']:>9.2f}x")
    print(f"vaelab_vs_plain={median['vaelab'] / median['plain tensors']:.3f}")


if __name__ == "__main__":
    main()
