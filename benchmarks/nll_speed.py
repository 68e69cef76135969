"""Speed of the importance-sampled log p(x): vaelab's estimator against a Pythae-style per-image loop.

Same trained model (MLP VAE 784-512-256 -> 16, Bernoulli, trained 3 epochs on dynamically binarised
Fashion-MNIST, or mnist5k when it is missing), same binarised test images, same K, in one run.

The reference follows the shape of Pythae's `VAE.get_nll`: one image at a time; for each block of
100 samples the image is copied 100 times and the copies are encoded again; sigmoid outputs scored
with F.binary_cross_entropy; one .item() per image; autograd on, as in Pythae (its get_nll has no
torch.no_grad). The same loop under no_grad is timed too, to show what that alone costs. vaelab's
estimator encodes each image once and scores (K_chunk, B) samples per pass with log_prob of the
model's distributions.

Each is timed --rounds times, interleaved; prints the medians' images/second for both, the ratio, and
whether the two mean estimates agree within their combined standard error. Then (unless --quick)
times K=1000 over the whole 10k test set.
Last line: `speedup=X agree=true|false`.

    python benchmarks/nll_speed.py [--images 200] [--k 1000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vaelab import runs
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import load_dataset
from vaelab.density import log_likelihood
from vaelab.errors import DataError
from vaelab.evaluate import nll_test_set
from vaelab.train import prepare_data, train

RESULTS = Path(__file__).parent / "results" / "nll_speed.json"


def pythae_style_nll(model, data: torch.Tensor, n_samples: int = 1000, batch_size: int = 100,
                     grad: bool = True) -> np.ndarray:
    """log p(x) per image the way Pythae's get_nll computes it: per image, re-encoding batch_size copies.

    Pythae's get_nll runs with autograd on (no torch.no_grad: every pass records a graph through the
    weights), hence grad=True by default; grad=False times the same loop under no_grad, for comparison.
    """
    with torch.set_grad_enabled(grad):
        return _pythae_style_nll(model, data, n_samples, batch_size)


def _pythae_style_nll(model, data: torch.Tensor, n_samples: int, batch_size: int) -> np.ndarray:
    n_full_batch = max(1, n_samples // batch_size)
    log_p = []
    for i in range(len(data)):
        x = data[i].unsqueeze(0)
        log_p_x = []
        for _ in range(n_full_batch):
            x_rep = torch.cat(batch_size * [x])
            h = model.encoder(x_rep)
            mu, log_var = model.posterior.mean(h), model.posterior.logvar(h)
            std = torch.exp(0.5 * log_var)
            z = mu + std * torch.randn_like(std)
            log_q_z_given_x = -0.5 * (log_var + (z - mu) ** 2 / torch.exp(log_var)).sum(dim=-1)
            log_p_z = -0.5 * (z**2).sum(dim=-1)  # the 2 pi terms cancel against q's
            recon_x = torch.sigmoid(model.decoder.body(z))
            log_p_x_given_z = -F.binary_cross_entropy(
                recon_x.reshape(x_rep.shape[0], -1), x_rep.reshape(x_rep.shape[0], -1), reduction="none"
            ).sum(dim=-1)
            log_p_x.append(log_p_x_given_z + log_p_z - log_q_z_given_x)
        log_p_x = torch.cat(log_p_x)
        log_p.append((torch.logsumexp(log_p_x, 0) - np.log(len(log_p_x))).item())
    return np.array(log_p)


def trained_model(workdir: Path):
    try:
        load_dataset("fashion-mnist")
        name = "fashion-mnist"
    except DataError:
        name = "mnist5k"
    config = RunConfig(data=DataConfig(name=name, binarize="dynamic"),
                       model=ModelConfig(model="vae", hidden=(512, 256), latent_dim=16, likelihood="bernoulli"),
                       train=TrainConfig(epochs=3, batch_size=128, device="cpu"))
    train(config, workdir / "run", progress=False)
    x, _ = nll_test_set(config, prepare_data(config))
    return runs.load(workdir / "run"), x, name


def mean_and_stderr(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="timings of each, interleaved; medians reported")
    parser.add_argument("--quick", action="store_true", help="skip timing the whole test set")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model, test_x, name = trained_model(Path(workdir))
    x = test_x[:args.images]
    print(f"model: MLP VAE 784-512-256-16 trained 3 epochs on {name}; {len(x)} test images, K={args.k}, "
          f"{torch.get_num_threads()} threads")

    def timed(estimator, times: list[float]):
        torch.manual_seed(0)  # the reference draws from the global generator
        start = time.perf_counter()
        value = estimator()
        times.append(time.perf_counter() - start)
        return value

    times_ref, times_ours, times_no_grad = [], [], []
    for _ in range(args.rounds):  # interleaved, medians: the machine is shared and noisy
        reference = timed(lambda: pythae_style_nll(model, x, n_samples=args.k), times_ref)
        timed(lambda: pythae_style_nll(model, x, n_samples=args.k, grad=False), times_no_grad)
        ours = timed(lambda: log_likelihood(model, x, k=args.k, seed=0).double().numpy(), times_ours)
    t_ref, t_ours, t_no_grad = (statistics.median(t) for t in (times_ref, times_ours, times_no_grad))

    m_ref, se_ref = mean_and_stderr(reference)
    m_ours, se_ours = mean_and_stderr(ours)
    combined = math.sqrt(se_ref**2 + se_ours**2)
    agree = abs(m_ref - m_ours) <= combined
    paired_m, paired_se = mean_and_stderr(ours - reference)
    print(f"\nmedians of {args.rounds} interleaved rounds")
    print(f"{'estimator':<22}{'seconds':>9}{'images/s':>11}{'mean log p(x)':>16}{'stderr':>9}")
    print(f"{'Pythae-style loop':<22}{t_ref:>9.2f}{len(x) / t_ref:>11.1f}{m_ref:>16.3f}{se_ref:>9.3f}")
    print(f"{'same loop, no_grad':<22}{t_no_grad:>9.2f}{len(x) / t_no_grad:>11.1f}{'':>16}{'':>9}")
    print(f"{'vaelab':<22}{t_ours:>9.2f}{len(x) / t_ours:>11.1f}{m_ours:>16.3f}{se_ours:>9.3f}")
    print(f"difference of means {m_ours - m_ref:+.3f} (combined standard error {combined:.3f}); "
          f"paired difference {paired_m:+.4f} +- {paired_se:.4f}")

    full = None
    if not args.quick:
        start = time.perf_counter()
        values = log_likelihood(model, test_x, k=1000, seed=0)
        seconds = time.perf_counter() - start
        full = {"images": len(test_x), "k": 1000, "seconds": seconds, "nll": float(-values.mean())}
        print(f"whole test set: {len(test_x)} images at K=1000 in {seconds:.1f} s "
              f"({len(test_x) / seconds:.0f} images/s), NLL {full['nll']:.2f} nats")
    speedup = t_ref / t_ours
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"data": name, "images": len(x), "k": args.k, "seconds_reference": t_ref,
                                   "seconds_vaelab": t_ours, "rounds_reference": times_ref,
                                   "rounds_vaelab": times_ours, "rounds_reference_no_grad": times_no_grad,
                                   "speedup_vs_no_grad_loop": t_no_grad / t_ours, "speedup": speedup, "agree": agree,
                                   "mean_reference": m_ref, "mean_vaelab": m_ours, "full_test_set": full},
                                  indent=2) + "\n")
    print(f"speedup={speedup:.2f} agree={'true' if agree else 'false'}")


if __name__ == "__main__":
    main()
