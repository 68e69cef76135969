"""Reproduce a published number: test NLL of the VAE with a Gaussian prior on dynamically binarised Fashion-MNIST.

Published: 228.70 +- 0.15 nats (Exemplar VAE, Norouzi et al., NeurIPS 2020, Table 1, "VAE w/ Gaussian
prior"), whose MLP VAE follows VampPrior (Tomczak & Welling 2018): two hidden layers of 300 gated units,
z = 40, Bernoulli likelihood, KL warm-up, Adam, batch 100. Their runs train for up to 2,000 epochs with
early stopping; this script has a budget of one hour on 2 cores: 120 CPU minutes (process time over
both threads), training and the K=5000 evaluation together. Training runs whole epochs until the next
would leave less than --eval-cpu-minutes for the evaluation.

Protocol here: train 50,000 / validation 10,000 (the last 10k of the training file) / test 10,000;
training images binarised afresh every batch; the test set binarised once with a fixed seed (0); log p(x)
by importance sampling with K = 5000 over the whole test set. Writes
benchmarks/results/fashion_mnist_nll.json with keys nll, stderr, k, epochs, wall_s (and details).

    python benchmarks/fashion_mnist_nll.py [--cpu-minutes 120] [--k 5000] [--out runs/fashion-mnist-nll]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from budget import train_within

from vaelab import runs
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.density import importance_sample
from vaelab.evaluate import nll_test_set
from vaelab.train import prepare_data

RESULTS = Path(__file__).parent / "results" / "fashion_mnist_nll.json"
PUBLISHED = (228.70, 0.15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-minutes", type=float, default=120, help="training + evaluation budget")
    parser.add_argument("--eval-cpu-minutes", type=float, default=16, help="kept back for the K=5000 estimate")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-epochs", type=float, default=10)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("runs/fashion-mnist-nll"))
    parser.add_argument("--resume", action="store_true", help="continue (or only evaluate) the run in --out")
    args = parser.parse_args()
    config = RunConfig(
        data=DataConfig(name="fashion-mnist", binarize="dynamic"),
        model=ModelConfig(model="vae", net="mlp", hidden=(300, 300), activation="gated", latent_dim=40,
                          likelihood="bernoulli"),
        train=TrainConfig(epochs=0, batch_size=100, lr=args.lr, warmup_epochs=args.warmup_epochs,
                          seed=0, device="cpu"),
    )
    data = prepare_data(config)
    spent = train_within(config, args.out, cpu_s=60 * (args.cpu_minutes - args.eval_cpu_minutes), dataset=data,
                         resume=args.resume)
    model = runs.load(args.out)
    x, seed = nll_test_set(config, data)
    cpu0, start = time.process_time(), time.perf_counter()
    estimate = importance_sample(model, x, k=args.k, seed=0)
    eval_s, eval_cpu_s = time.perf_counter() - start, time.process_time() - cpu0
    summary = estimate.summary(784)
    records = runs.read_metrics(args.out)
    epochs = len(records)
    result = {"nll": summary["nll"], "stderr": summary["nll_stderr"], "k": args.k, "epochs": epochs,
              "wall_s": spent["wall_s"] + eval_s, "cpu_s": spent["cpu_s"] + eval_cpu_s,
              "train_s": spent["wall_s"], "train_cpu_s": spent["cpu_s"], "eval_s": eval_s, "eval_cpu_s": eval_cpu_s,
              "train_epoch_s": sum(r["seconds"] for r in records), "test_binarize_seed": seed,
              "ess_fraction": summary["ess_fraction"], "val_elbo": -records[-1]["val_loss"],
              "published": {"nll": PUBLISHED[0], "stderr": PUBLISHED[1]}, "config": config.to_dict(),
              "threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':<26}{'test NLL (nats)':>18}{'epochs':>8}{'CPU minutes':>13}{'wall minutes':>14}")
    print(f"{'published (Exemplar VAE)':<26}{PUBLISHED[0]:>12.2f} +- {PUBLISHED[1]:.2f}{'':>8}{'':>13}{'':>14}")
    print(f"{'vaelab':<26}{result['nll']:>12.2f} +- {result['stderr']:.2f}{epochs:>8}"
          f"{result['cpu_s'] / 60:>13.1f}{result['wall_s'] / 60:>14.1f}")
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
