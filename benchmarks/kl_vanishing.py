"""KL vanishing shown and cured: five sentence VAEs on the fortunes corpus with the same budget.

With an autoregressive LSTM decoder a VAE can model sentences without its code, and the KL term
collapses to zero (Bowman et al. 2016). Variants, all with the same encoder/decoder, epochs and batches:

    plain      Gaussian posterior, beta = 1 from the first step
    warm-up    the same with linear KL warm-up over the first half of training (Bowman et al. 2016)
    bn-vae     batch-normalised posterior means, gamma = 0.5: E[KL] >= D gamma^2 / 2 (Zhu et al. 2020)
    vmf        von Mises-Fisher posterior with fixed kappa and a uniform prior: a constant KL > 0
               (Davidson et al. 2018; Xu & Durrett 2018)
    free-bits  each latent dimension's KL counts at least lambda nats (Kingma et al. 2016)

For each: test KL, active units, reconstruction -log p(x|z), NLL (importance sampling, K samples) and
perplexity exp(NLL / tokens), printed as a table and written to benchmarks/results/kl_vanishing.json
(one object per variant with keys kl, active_units, recon, nll, ppl).

    OMP_NUM_THREADS=1 python benchmarks/kl_vanishing.py [--epochs 4] [--hidden 128] [--k 20] [--variants plain,bn-vae]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from vaelab import runs
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import load_dataset
from vaelab.data.text import token_counts
from vaelab.density import importance_sample
from vaelab.latent_stats import active_units
from vaelab.objectives import elbo
from vaelab.steps import mean_terms
from vaelab.train import train
from vaelab.vmf import HypersphericalUniform, VonMisesFisher

RESULTS = Path(__file__).parent / "results" / "kl_vanishing.json"
LATENT, GAMMA, KAPPA, LAMBDA = 32, 0.5, 30.0, 0.15

VARIANTS = {  # name -> (model fields, train fields)
    "plain": ({}, {}),
    "warm-up": ({}, {"warmup_epochs": "half"}),
    "bn-vae": ({"bn_mu": GAMMA}, {}),
    "vmf": ({"latent": "vmf", "kappa": KAPPA}, {}),
    "free-bits": ({}, {"free_bits": LAMBDA}),
}


def bound(name: str) -> float:
    """The KL floor each cure promises (nats per sentence), 0 for none."""
    if name == "bn-vae":
        return LATENT * GAMMA**2 / 2
    if name == "vmf":
        loc = torch.nn.functional.normalize(torch.ones(1, LATENT), dim=-1)
        q = VonMisesFisher(loc, torch.tensor([[KAPPA]]))
        return float(torch.distributions.kl_divergence(q, HypersphericalUniform(LATENT)))
    return LATENT * LAMBDA if name == "free-bits" else 0.0


def config(name: str, epochs: int, hidden: int) -> RunConfig:
    model_fields, train_fields = VARIANTS[name]
    train_fields = {k: (epochs / 2 if v == "half" else v) for k, v in train_fields.items()}
    return RunConfig(
        data=DataConfig(name="fortunes"),
        model=ModelConfig(model="text-vae", net="lstm", hidden=(hidden,), latent_dim=LATENT, embedding_dim=128,
                          **model_fields),
        train=TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, seed=0, device="cpu", **train_fields),
    )


def evaluate(run_dir: Path, test_x: torch.Tensor, k: int) -> dict[str, float]:
    model = runs.load(run_dir)
    torch.manual_seed(0)
    terms = mean_terms(model, lambda m, xb, beta: elbo(m(xb), xb, beta=beta), test_x, batch_size=500)
    estimate = importance_sample(model, test_x, k=k, seed=0)
    nll = -estimate.log_px.double()
    return {"kl": terms["kl"], "active_units": active_units(model, test_x)["active_units"],
            "recon": terms["recon"], "elbo": -terms["loss"], "nll": float(nll.mean()),
            "ppl": math.exp(float(nll.sum() / token_counts(test_x).double().sum())), "k": k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--k", type=int, default=20, help="importance samples per test sentence")
    parser.add_argument("--out", type=Path, default=Path("runs/kl-vanishing"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    data = load_dataset("fortunes")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.variants.split(","):
        run_dir = args.out / name
        start = time.perf_counter()
        wanted = config(name, args.epochs, args.hidden)
        if (run_dir / "config.json").exists():  # a run of other settings is not reused under these
            stored = runs.load_config(run_dir)
            if (stored.model.hidden, stored.train.epochs) != (wanted.model.hidden, wanted.train.epochs):
                raise SystemExit(f"{run_dir} was trained with --hidden {stored.model.hidden[0]} --epochs "
                                 f"{stored.train.epochs}; give another --out, or remove it")
        if not runs.is_complete(run_dir):
            train(wanted, run_dir, resume=(run_dir / "config.json").exists(), dataset=data, progress=False)
        results[name] = {**evaluate(run_dir, data.test.x, args.k), "kl_floor": bound(name),
                         "epochs": args.epochs, "hidden": args.hidden, "seconds": time.perf_counter() - start}
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in results[name].items()), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    # rows of variants run before (separate invocations) stay in the file and the table: each says its epochs and K
    print(f"\n{'variant':<11}{'KL':>8}{'KL floor':>10}{'active':>8}{'recon':>9}{'NLL':>9}{'PPL':>8}"
          f"{'epochs':>8}{'K':>6}")
    for name, r in results.items():
        print(f"{name:<11}{r['kl']:>8.2f}{r['kl_floor']:>10.2f}{r['active_units']:>8}{r['recon']:>9.2f}"
              f"{r['nll']:>9.2f}{r['ppl']:>8.1f}{r.get('epochs', '?'):>8}{r.get('k', '?'):>6}")
    print(f"(nats per test sentence; NLL by importance sampling with K samples per sentence; written: {RESULTS})")


if __name__ == "__main__":
    main()
