"""One text-VAE training step eager (the reference) against torch.compile with the RNNs in pieces and traced.

Under torch.compile dynamo leaves nn.LSTM/nn.GRU out of its graphs unless torch._dynamo.config.allow_rnn is
set: the step becomes nine graphs with the RNNs run eagerly between them ("in pieces"). vaelab's --compile
(steps.compile_step) sets allow_rnn while it traces a model with RNNs, so the step is one graph ("traced").
This script times the three in one process: the model of README's text VAE (--hidden 256, --latent-dim 32,
--embedding-dim 128) on random sentences shaped like fortunes' (4-20 tokens, vocabulary 8,000, length
21), batch 64, the trainer's loss (ELBO) and fused Adam step. Rounds of --steps steps alternate between
the variants, each with its own copy of the model and optimiser; it prints the graphs each compiled
variant made, the median time per step and its ratio to eager. Compiling takes ~20 s in pieces and ~70 s
traced on a 2-core CPU.

    python benchmarks/text_step.py [--net lstm|gru] [--rounds 5] [--steps 10]

The last line is `traced_vs_eager=X traced_vs_pieces=Y`.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
import types
from collections.abc import Callable

import torch

from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.models import build_model
from vaelab.steps import compile_step, make_optimizer, objective_for, optimizer_step, step_loss

OPTIONS = {"free_bits": 0.0, "kl_balance": False}


def sentences(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """n random sentences of 4..length-1 tokens from ids 4..vocab-1, then <eos> (2) and padding (0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, vocab, (n, length), generator=g)
    ends = torch.randint(4, length, (n,), generator=g)
    positions = torch.arange(length)
    x[positions >= ends[:, None]] = 0
    x[torch.arange(n), ends] = 2
    return x


def own_code(function: types.FunctionType) -> types.FunctionType:
    """A copy of function with a code object of its own: dynamo caches graphs per code object, so a second
    torch.compile of step_loss would otherwise reuse the first one's graph whatever allow_rnn was."""
    copied = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                                function.__defaults__, function.__closure__)
    copied.__kwdefaults__ = function.__kwdefaults__
    return copied


def run(*, net: str = "lstm", hidden: int = 256, latent_dim: int = 32, embedding_dim: int = 128,
        vocab: int = 8000, length: int = 21, batch_size: int = 64, rounds: int = 5,
        steps: int = 10) -> dict[str, dict[str, float]]:
    """{variant: {"ms": median ms per step, "graphs": graphs compiled}} for eager, in pieces and traced."""
    config = RunConfig(data=DataConfig(name="fortunes"), train=TrainConfig(batch_size=batch_size),
                       model=ModelConfig(model="text-vae", net=net, hidden=(hidden,), latent_dim=latent_dim,
                                         embedding_dim=embedding_dim, input_shape=(length,), vocab_size=vocab))
    loss_terms = objective_for(config)
    torch.manual_seed(0)
    base = build_model(config.model).train()
    x = sentences(batch_size, length, vocab)
    counters = torch._dynamo.utils.counters

    def variant(name: str) -> tuple[Callable[[], None], int]:
        model = copy.deepcopy(base)
        optimizer = make_optimizer(model, 1e-3)
        if name == "eager":
            def forward(m, xb, beta, **options):
                return step_loss(loss_terms, m, xb, beta=float(beta), **options)
        elif name == "in pieces":
            forward = torch.compile(functools.partial(own_code(step_loss), loss_terms), dynamic=False)
        else:
            forward = compile_step(loss_terms, model, x, **OPTIONS)

        def step() -> None:
            loss, _ = forward(model, x, beta=torch.tensor(1.0), **OPTIONS)
            for p in model.parameters():
                p.grad = None
            loss.backward()
            optimizer_step(optimizer)
        before = counters["stats"]["unique_graphs"]
        for _ in range(3):  # warm-up: compiling, Adam's state
            step()
        return step, counters["stats"]["unique_graphs"] - before

    variants = {name: variant(name) for name in ("eager", "in pieces", "traced")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (step, _) in variants.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: {"ms": 1000 * statistics.median(times[name]), "graphs": variants[name][1]} for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=("lstm", "gru"), default="lstm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results = run(net=args.net, rounds=args.rounds, steps=args.steps)
    eager = results["eager"]["ms"]
    print(f"text VAE ({args.net}, hidden 256, batch 64), {torch.get_num_threads()} thread(s), "
          f"{args.rounds} rounds of {args.steps} steps")
    print(f"{'variant':<12}{'graphs':>8}{'ms per step':>13}{'vs eager':>10}")
    for name, r in results.items():
        graphs = r["graphs"] if name != "eager" else "-"
        print(f"{name:<12}{graphs:>8}{r['ms']:>13.1f}{eager / r['ms']:>9.2f}x")
    traced = results["traced"]["ms"]
    print(f"traced_vs_eager={eager / traced:.2f} traced_vs_pieces={results['in pieces']['ms'] / traced:.2f}")


if __name__ == "__main__":
    main()
