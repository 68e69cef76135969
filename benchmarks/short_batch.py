"""What --compile's last, short batch of an epoch costs: compiling a graph of its own against one eager step.

The trainer compiles the step at the first batch's size and runs a batch of another size (an epoch's last,
when the training set is no multiple of --batch-size) eagerly. Until 2026-11-30 it compiled that shape too.
This script measures both in one process with an empty compiler cache (a temporary TORCHINDUCTOR_CACHE_DIR):
the first compiled call at the full batch (compiling), the first compiled call at the short batch (the
second compile the trainer no longer makes), and the median of --steps eager steps at the short batch (the
reference, what it does now). The ratio says how many epochs' worth of eager short batches one such compile
costs. Models: the README's MLP VAE on 784 pixels (--model mlp, batch 128, short batch 117; Fashion-MNIST's
50,000 training images leave 80) or its text VAE (--model text, LSTM, batch 128, short batch 117, as on
fortunes' 17,013 training sentences; compiling takes minutes on a 2-core CPU).

    python benchmarks/short_batch.py [--model mlp|text] [--steps 5]

The last line is `recompile_vs_eager_step=X`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from text_step import sentences

from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.models import build_model
from vaelab.steps import compile_step, objective_for, step_loss

OPTIONS = {"free_bits": 0.0, "kl_balance": False}


def config_for(model: str, *, hidden: int, latent_dim: int) -> RunConfig:
    """The README's MLP VAE (784 pixels) or text VAE (vocabulary 8,000, length 21), at the given sizes."""
    if model == "text":
        return RunConfig(data=DataConfig(name="fortunes"), model=ModelConfig(
            model="text-vae", net="lstm", hidden=(hidden,), latent_dim=latent_dim, input_shape=(21,),
            vocab_size=8000))
    return RunConfig(data=DataConfig(name="fashion-mnist"), train=TrainConfig(),
                     model=ModelConfig(hidden=(2 * hidden, hidden), latent_dim=latent_dim, input_shape=(1, 28, 28)))


def batch(config: RunConfig, n: int) -> torch.Tensor:
    """n examples of the model's input: random sentences, or random pixels in [0, 1]."""
    if config.model.model == "text-vae":
        return sentences(n, config.model.input_shape[0], config.model.vocab_size)
    return torch.rand(n, *config.model.input_shape, generator=torch.Generator().manual_seed(0))


def run(*, model: str = "mlp", hidden: int = 256, latent_dim: int = 16, batch_size: int = 128, short: int = 117,
        steps: int = 5) -> dict[str, float]:
    """Seconds: "compile" (first compiled call, full batch), "recompile" (first compiled call, short batch),
    "eager_step" (median eager step, short batch), each a forward and backward pass."""
    config = config_for(model, hidden=hidden, latent_dim=latent_dim)
    loss_terms = objective_for(config)
    torch.manual_seed(0)
    net = build_model(config.model).train()
    full, part = batch(config, batch_size), batch(config, short)
    compiled = compile_step(loss_terms, net, full, **OPTIONS)

    def timed(step) -> float:
        t0 = time.perf_counter()
        loss, _ = step()
        loss.backward()
        for p in net.parameters():
            p.grad = None
        return time.perf_counter() - t0

    beta = torch.tensor(1.0)
    result = {"compile": timed(lambda: compiled(net, full, beta=beta, **OPTIONS)),
              "recompile": timed(lambda: compiled(net, part, beta=beta, **OPTIONS))}
    timed(lambda: step_loss(loss_terms, net, part, beta=1.0, **OPTIONS))  # warm-up
    result["eager_step"] = statistics.median(
        timed(lambda: step_loss(loss_terms, net, part, beta=1.0, **OPTIONS)) for _ in range(steps))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "text"), default="mlp")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    # an empty compiler cache, read by inductor when it first compiles (set here, not on import: a test
    # importing run() must not move the cache of the other tests' process)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vaelab-short-batch-")
    r = run(model=args.model, steps=args.steps)
    print(f"{args.model} VAE, batch 128 then 117, {torch.get_num_threads()} thread(s), empty compiler cache "
          f"({os.environ['TORCHINDUCTOR_CACHE_DIR']})")
    print(f"{'what':<54}{'seconds':>10}")
    print(f"{'compile at the full batch (first call)':<54}{r['compile']:>10.2f}")
    print(f"{'compile again at the short batch (until 2026-11-30)':<54}{r['recompile']:>10.2f}")
    print(f"{'one eager step at the short batch (now; reference)':<54}{r['eager_step']:>10.4f}")
    print(f"recompile_vs_eager_step={r['recompile'] / r['eager_step']:.0f}")


if __name__ == "__main__":
    sys.exit(main())
