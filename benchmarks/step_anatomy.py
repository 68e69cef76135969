"""Where the time of a training step goes: vaelab's step against plain autograd, a hand-written step, and its parts.

The MLP VAE of benchmarks/train_speed.py (784-512-256 -> 16 -> 256-512-784, Bernoulli, fused Adam, batch
128) on Fashion-MNIST's training split (mnist5k when it is missing), all in one process, with denormals
flushed as the trainer runs, in alternating rounds of --steps steps; medians after two warm-up rounds.

- vaelab: the trainer's step (vaelab's model and ELBO through steps.step_loss, gradients dropped, backward,
  steps.optimizer_step), as it runs by default on this machine (on non-Intel CPUs with AVX-512 its large
  matmuls go through oneDNN, vaelab.linear; the other rows use torch's default, MKL);
- plain autograd: the same network in plain tensors (pytorch/examples' loss, one BCE-with-logits sum), the
  same optimiser step;
- hand-written: the same step with no autograd at all: the backward pass written out (one mm per product,
  ReLU masks, the reparameterisation's and KL's gradients by hand) into preallocated gradients, then the
  same fused Adam. It is checked against autograd first. It is what an eager step can cost with every
  framework overhead removed, short of fusing kernels (what --compile does);
- its matmuls alone: the step's 17 products (6 forward, 11 backward) with the same shapes and layouts;
- fused Adam alone: steps.optimizer_step over the model's 1.08 M parameters.

Then the framework's own cost per step: vaelab's step and the plain-autograd one for a tiny network
(784-8-8 -> 16 -> 8-8-784) on batches of 2, where the arithmetic is negligible and what is left is
Python, dispatch, autograd and the optimiser's bookkeeping.

The FLOP limit is train_speed's: the machine's fp32 matmul peak (better of MKL and oneDNN on square
products, measured before and after, the better kept) over the model's FLOPs per sample (3x forward).

    python benchmarks/step_anatomy.py [--rounds 10] [--steps 50] [--results FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from model_overhead import PlainVAE
from train_speed import BATCH, describe, flops_per_sample, load, machine, matmul_rate

from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.models import VAE
from vaelab.steps import objective_for, optimizer_step, step_loss
from vaelab.system import flush_denormals, keep_freed_memory

LATENT = 16
RESULTS = Path(__file__).parent / "results" / "step_anatomy.json"


def adam(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3, fused=True)


class VaelabStep:
    """The trainer's step (train.Trainer._epoch without the batch bookkeeping)."""

    def __init__(self, shape: tuple[int, int, int], hidden: tuple[int, ...] = (512, 256)):
        config = RunConfig(data=DataConfig(name="fashion-mnist", binarize="none"),
                           model=ModelConfig(model="vae", net="mlp", hidden=hidden, latent_dim=LATENT),
                           train=TrainConfig(batch_size=BATCH, device="cpu"))
        self.model = VAE(input_shape=shape, latent_dim=LATENT, hidden=hidden)
        self.params = list(self.model.parameters())
        self.optimizer = adam(self.params)
        self.loss_terms = objective_for(config)
        self.totals = torch.zeros(3)
        self.shape = shape

    def __call__(self, x: torch.Tensor) -> None:
        x = x.view(-1, *self.shape)
        loss, totals = step_loss(self.loss_terms, self.model, x, beta=1.0, free_bits=0.0, kl_balance=False)
        for p in self.params:
            p.grad = None
        (loss / x.shape[0]).backward()
        optimizer_step(self.optimizer)
        self.totals += totals


class PlainStep:
    """pytorch/examples' network and loss in plain tensors, with the trainer's optimiser step."""

    def __init__(self, hidden: tuple[int, int] = (512, 256)):
        self.model = PlainVAE()
        if hidden != (512, 256):
            wide, narrow = hidden
            m = self.model
            linear = torch.nn.Linear
            m.fc1, m.fc2 = linear(784, wide), linear(wide, narrow)
            m.fc_mu, m.fc_logvar = linear(narrow, LATENT), linear(narrow, LATENT)
            m.fc3, m.fc4, m.fc5 = linear(LATENT, narrow), linear(narrow, wide), linear(wide, 784)
        self.params = list(self.model.parameters())
        self.optimizer = adam(self.params)

    def __call__(self, x: torch.Tensor) -> None:
        loss = self.model(x)
        for p in self.params:
            p.grad = None
        loss.backward()
        optimizer_step(self.optimizer)


class HandWrittenStep:
    """PlainStep's network and loss with the backward pass written out: no autograd graph.

    Parameters as in PlainVAE, except that the mean and log-variance heads are one 256 -> 32 layer.
    Loss per step: (BCE-with-logits sum + KL sum) / batch, the KL of Kingma & Welling 2014, Appendix B.
    """

    def __init__(self, plain: PlainVAE):
        m = plain
        with torch.no_grad():
            head_w = torch.cat([m.fc_mu.weight, m.fc_logvar.weight])
            head_b = torch.cat([m.fc_mu.bias, m.fc_logvar.bias])
        self.weights = [m.fc1.weight, m.fc2.weight, head_w.requires_grad_(), m.fc3.weight, m.fc4.weight,
                        m.fc5.weight]
        self.biases = [m.fc1.bias, m.fc2.bias, head_b.requires_grad_(), m.fc3.bias, m.fc4.bias, m.fc5.bias]
        self.params = [p for pair in zip(self.weights, self.biases) for p in pair]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer = adam(self.params)

    @torch.no_grad()
    def gradients(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Fills each parameter's .grad; returns the loss."""
        (w1, w2, wh, w3, w4, w5), (b1, b2, bh, b3, b4, b5) = self.weights, self.biases
        h1 = torch.addmm(b1, x, w1.t()).relu_()
        h2 = torch.addmm(b2, h1, w2.t()).relu_()
        head = torch.addmm(bh, h2, wh.t())
        mu, logvar = head[:, :LATENT], head[:, LATENT:]
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(mu) if eps is None else eps
        z = torch.addcmul(mu, eps, std)  # Kingma & Welling 2014, eq. 10's reparameterisation
        d1 = torch.addmm(b3, z, w3.t()).relu_()
        d2 = torch.addmm(b4, d1, w4.t()).relu_()
        logits = torch.addmm(b5, d2, w5.t())
        variance = std * std
        kl = -0.5 * torch.sum(1 + logvar - mu.square() - variance)
        scale = 1.0 / x.shape[0]
        loss = (F.binary_cross_entropy_with_logits(logits, x, reduction="sum") + kl) * scale
        g = torch.sigmoid(logits).sub_(x).mul_(scale)  # d loss / d logits
        for w, b, h_in in ((w5, b5, d2), (w4, b4, d1)):
            torch.mm(g.t(), h_in, out=w.grad)
            torch.sum(g, 0, out=b.grad)
            g = torch.mm(g, w).mul_(h_in > 0)  # through the ReLU that made h_in
        torch.mm(g.t(), z, out=w3.grad)
        torch.sum(g, 0, out=b3.grad)
        g_z = torch.mm(g, w3)
        g_mu = torch.add(g_z, mu, alpha=scale)  # decoder path + KL's mu
        g_logvar = (g_z * eps * std).mul_(0.5).add_(variance.sub_(1), alpha=0.5 * scale)  # dz/dlogvar, KL's
        g = torch.cat([g_mu, g_logvar], 1)
        for w, b, h_in in ((wh, bh, h2), (w2, b2, h1)):
            torch.mm(g.t(), h_in, out=w.grad)
            torch.sum(g, 0, out=b.grad)
            g = torch.mm(g, w).mul_(h_in > 0)
        torch.mm(g.t(), x, out=w1.grad)  # the input needs no gradient
        torch.sum(g, 0, out=b1.grad)
        return loss

    def __call__(self, x: torch.Tensor) -> None:
        self.gradients(x)
        optimizer_step(self.optimizer)


class Matmuls:
    """The hand-written step's 17 products, same shapes and layouts, nothing else."""

    def __init__(self, x: torch.Tensor):
        sizes = [784, 512, 256, 2 * LATENT, 256, 512, 784]
        ins = [LATENT if i == 3 else n for i, n in enumerate(sizes[:-1])]
        self.layers = [(torch.randn(n_out, n_in), torch.randn(n_out), torch.randn(BATCH, n_in),
                        torch.randn(BATCH, n_out), torch.empty(n_out, n_in)) for n_in, n_out in zip(ins, sizes[1:])]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> None:
        for i, (w, b, h_in, g, w_grad) in enumerate(self.layers):
            torch.addmm(b, x if i == 0 else h_in, w.t())
            torch.mm(g.t(), x if i == 0 else h_in, out=w_grad)
            if i:
                torch.mm(g, w)


class AdamAlone:
    def __init__(self, params: list[torch.Tensor]):
        self.params = [p.detach().clone().requires_grad_() for p in params]
        for p in self.params:
            p.grad = torch.randn_like(p) * 1e-3
        self.optimizer = adam(self.params)
        self.optimizer.step()  # creates the state; optimizer_step's fast path from now on

    def __call__(self, x: torch.Tensor) -> None:
        optimizer_step(self.optimizer)


def check_hand_written(x: torch.Tensor) -> float:
    """Largest relative difference between the hand-written gradients and autograd's on one batch."""
    torch.manual_seed(0)
    plain = PlainVAE()
    hand = HandWrittenStep(plain)
    eps = torch.randn(x.shape[0], LATENT)
    loss = hand.gradients(x, eps)
    h = F.relu(plain.fc2(F.relu(plain.fc1(x))))
    mu, logvar = plain.fc_mu(h), plain.fc_logvar(h)
    z = mu + eps * torch.exp(0.5 * logvar)
    logits = plain.fc5(F.relu(plain.fc4(F.relu(plain.fc3(z)))))
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    reference = (F.binary_cross_entropy_with_logits(logits, x, reduction="sum") + kl) / x.shape[0]
    reference.backward()
    assert torch.allclose(loss, reference, rtol=1e-5), (loss, reference)
    pairs = [(hand.weights[0].grad, plain.fc1.weight.grad), (hand.biases[1].grad, plain.fc2.bias.grad),
             (hand.weights[2].grad, torch.cat([plain.fc_mu.weight.grad, plain.fc_logvar.weight.grad])),
             (hand.biases[2].grad, torch.cat([plain.fc_mu.bias.grad, plain.fc_logvar.bias.grad])),
             (hand.weights[3].grad, plain.fc3.weight.grad), (hand.weights[5].grad, plain.fc5.weight.grad)]
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)


def steps_per_s(step: Callable[[torch.Tensor], None], x: torch.Tensor, steps: int, batch: int = BATCH) -> float:
    perm = torch.randperm(len(x))
    start = time.perf_counter()
    for i in range(steps):
        step(torch.index_select(x, 0, perm[i * batch:(i + 1) * batch]))
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the JSON results go (default: benchmarks/results/step_anatomy.json)")
    args = parser.parse_args()
    keep_freed_memory()
    data = load(args.steps * BATCH)
    x = data.train.x.flatten(1).contiguous()
    error = check_hand_written(x[:BATCH])
    assert error < 1e-4, f"the hand-written gradients differ from autograd's by {error:.1e}"
    flops, _ = flops_per_sample(data)
    peak = matmul_rate()
    torch.manual_seed(0)
    vaelab_step = VaelabStep(data.shape)
    torch.manual_seed(0)
    plain = PlainStep()
    torch.manual_seed(0)
    hand = HandWrittenStep(PlainVAE())
    parts = {"vaelab": vaelab_step, "plain autograd": plain, "hand-written": hand,
             "its matmuls alone": Matmuls(x), "fused Adam alone": AdamAlone(plain.params)}
    tiny = {"vaelab": VaelabStep(data.shape, hidden=(8, 8)), "plain autograd": PlainStep(hidden=(8, 8))}
    rates: dict[str, list[float]] = {name: [] for name in parts}
    tiny_rates: dict[str, list[float]] = {name: [] for name in tiny}
    with flush_denormals():
        for _ in range(args.rounds + 2):
            for name, step in parts.items():
                rates[name].append(steps_per_s(step, x, args.steps))
            for name, step in tiny.items():
                tiny_rates[name].append(steps_per_s(step, x, 4 * args.steps, batch=2))
    peak = max(peak, matmul_rate())
    ms = {name: 1e3 / statistics.median(r[2:]) for name, r in rates.items()}
    ratio = {name: statistics.median(a / b for a, b in zip(r[2:], rates["vaelab"][2:])) for name, r in rates.items()}
    limit = peak / flops  # samples/s
    about = machine()
    print(f"data: {data.name}, batch {BATCH}; hand-written gradients within {error:.0e} (relative) of autograd's; "
          f"{args.rounds} rounds of {args.steps} steps\nmachine: {describe(about)}")
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s, {flops / 1e6:.2f} MFLOP per sample: FLOP limit "
          f"{limit:,.0f} samples/s, {BATCH / limit * 1e3:.2f} ms per step\n")
    print(f"{'per step':<20}{'ms':>7}{'speed vs vaelab':>17}{'of FLOP limit':>15}")
    for name in parts:
        whole = name in ("vaelab", "plain autograd", "hand-written")
        print(f"{name:<20}{ms[name]:>7.2f}{ratio[name]:>16.2f}x"
              + (f"{BATCH / ms[name] * 1e3 / limit:>15.0%}" if whole else ""))
    rest = ms["hand-written"] - ms["its matmuls alone"] - ms["fused Adam alone"]
    ceiling = BATCH / (ms["its matmuls alone"] + ms["fused Adam alone"]) * 1e3 / limit
    print(f"\nhand-written step less its matmuls and Adam: {rest:.2f} ms (elementwise work, gathering the "
          f"batch, dispatch); its matmuls and Adam alone would be {ceiling:.0%} of the limit")
    overhead = {name: 1e3 / statistics.median(r[2:]) for name, r in tiny_rates.items()}
    print(f"framework cost per step (784-8-8-16-8-8-784, batch 2): vaelab {overhead['vaelab']:.2f} ms, "
          f"plain autograd {overhead['plain autograd']:.2f} ms")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"machine": about, "data": data.name, "steps_per_round": args.steps,
                                        "steps_per_s": rates,
                                        "matmul_peak_flops": peak, "model_flops_per_sample": flops,
                                        "ms_per_step": ms, "speed_vs_vaelab": ratio,
                                        "tiny_network_ms_per_step": overhead}, indent=2) + "\n")
    print(f"vaelab_vs_hand_written={1 / ratio['hand-written']:.3f} "
          f"hand_written_fraction_of_limit={BATCH / ms['hand-written'] * 1e3 / limit:.2f}")


if __name__ == "__main__":
    main()
