"""Speed of the importance-sampled log p(x): vaelab's estimator against Pythae's per-image `get_nll` loop.

Same trained model (MLP VAE 784-512-256 -> 16, Bernoulli, trained 3 epochs on dynamically binarised
Fashion-MNIST, or mnist5k when it is missing), same binarised test images, same K, in one run.

The reference is Pythae's own `VAE.get_nll` (pip install -e .[bench] installs pythae 0.1.2, which needs
no torchvision), run on a Pythae VAE whose encoder and decoder are the trained model's layers (same
weights) as plain nn.Linear modules, as a Pythae user's network has them (vaelab's own Linear layers
take oneDNN's matmul on the CPU, see vaelab.linear; the row "vaelab, BLAS matmuls" shows vaelab's
estimator without that): one image at a time; for each block of 100 samples the image is copied 100 times and the
copies are encoded again; sigmoid outputs scored with F.binary_cross_entropy; one .item() per image;
autograd on (its get_nll has no torch.no_grad). Without pythae the benchmark falls back to a loop of the
same shape written here (`pythae_style_nll`), which is also always timed: it returns per-image values,
so the agreement check uses them (Pythae's get_nll returns only the mean), and with grad=False it shows
what autograd alone costs. vaelab's estimator encodes each image once and scores (K_chunk, B) samples
per pass with log_prob of the model's distributions.

Each is timed --rounds times, interleaved; prints the medians' images/second, the ratio, and whether
the estimates agree: vaelab's and the loop's per-image difference within 3 of its standard errors (the
images' spread in difficulty cancels in it, and dwarfed an 8-nat bias in the means' combined error), and
Pythae's mean within their combined standard error. Then (unless --quick) times K=1000 over
the whole 10k test set.
Last line: `speedup=X agree=true|false`.

    python benchmarks/nll_speed.py [--images 200] [--k 1000] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vaelab import runs
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import load_dataset
from vaelab.density import log_likelihood, mean_and_stderr
from vaelab.errors import DataError
from vaelab.evaluate import nll_test_set
from vaelab.linear import Linear, onednn_off
from vaelab.prepare import prepare_data
from vaelab.train import train

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


def with_torch_linear(model: nn.Module) -> nn.Module:
    """A copy of model whose vaelab.linear.Linear layers are plain nn.Linear with the same weights."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
    return model


def pythae_vae(model):
    """A Pythae VAE whose encoder and decoder are `model`'s layers (shared weights), or None without pythae."""
    try:
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
    except ImportError:
        return None

    class Encoder(BaseEncoder):  # the shape of Pythae's own Encoder_VAE_MLP.forward
        def __init__(self):
            super().__init__()
            self.layers, self.embedding, self.log_var = model.encoder, model.posterior.mean, model.posterior.logvar

        def forward(self, x):
            h = self.layers(x)
            return ModelOutput(embedding=self.embedding(h), log_covariance=self.log_var(h))

    class Decoder(BaseDecoder):  # Pythae's Decoder_AE_MLP: sigmoid outputs, scored with binary_cross_entropy
        def __init__(self):
            super().__init__()
            self.layers = model.decoder.body

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.layers(z)))

    config = VAEConfig(input_dim=tuple(model.input_shape), latent_dim=model.latent_dim, reconstruction_loss="bce")
    return VAE(config, encoder=Encoder(), decoder=Decoder()).eval()


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
    reference_model = with_torch_linear(model)  # the references' layers: PyTorch's default matmuls
    pythae = pythae_vae(reference_model)
    print(f"model: MLP VAE 784-512-256-16 trained 3 epochs on {name}; {len(x)} test images, K={args.k}, "
          f"{torch.get_num_threads()} threads; reference: "
          + ("Pythae's own get_nll" if pythae is not None else "the Pythae-style loop (pythae not installed)"))

    def timed(estimator, times: list[float]):
        torch.manual_seed(0)  # the references draw from the global generator
        start = time.perf_counter()
        value = estimator()
        times.append(time.perf_counter() - start)
        return value

    times = {"pythae": [], "loop": [], "loop, no_grad": [], "vaelab, BLAS matmuls": [], "vaelab": []}
    for _ in range(args.rounds):  # interleaved, medians: the machine is shared and noisy
        if pythae is not None:
            pythae_mean = timed(lambda: float(pythae.get_nll(x, n_samples=args.k, batch_size=100)), times["pythae"])
        loop = timed(lambda: pythae_style_nll(reference_model, x, n_samples=args.k), times["loop"])
        timed(lambda: pythae_style_nll(reference_model, x, n_samples=args.k, grad=False), times["loop, no_grad"])
        with onednn_off():
            timed(lambda: log_likelihood(model, x, k=args.k, seed=0), times["vaelab, BLAS matmuls"])
        ours = timed(lambda: log_likelihood(model, x, k=args.k, seed=0).double().numpy(), times["vaelab"])
    median = {k: statistics.median(v) for k, v in times.items() if v}
    reference = "pythae" if pythae is not None else "loop"

    m_loop, se_loop = mean_and_stderr(loop)
    m_ours, se_ours = mean_and_stderr(ours)
    # Pythae's get_nll returns only the mean; its per-image spread is the loop's (the same estimator)
    m_ref = pythae_mean if pythae is not None else m_loop
    combined = math.sqrt(se_loop**2 + se_ours**2)
    paired_m, paired_se = mean_and_stderr(ours - loop)
    agree = abs(m_ref - m_ours) <= combined and abs(paired_m) <= 3 * paired_se
    print(f"\nmedians of {args.rounds} interleaved rounds")
    print(f"{'estimator':<26}{'seconds':>9}{'images/s':>11}{'vaelab is':>11}{'mean log p(x)':>16}{'stderr':>9}")
    rows = {"pythae": ("Pythae VAE.get_nll", m_ref if pythae is not None else None, None),
            "loop": ("Pythae-style loop", m_loop, se_loop), "loop, no_grad": ("same loop, no_grad", None, None),
            "vaelab, BLAS matmuls": ("vaelab, BLAS matmuls", None, None), "vaelab": ("vaelab", m_ours, se_ours)}
    for key, t in median.items():
        label, mean, se = rows[key]
        print(f"{label:<26}{t:>9.2f}{len(x) / t:>11.1f}{t / median['vaelab']:>10.2f}x"
              f"{'' if mean is None else f'{mean:.3f}':>16}{'' if se is None else f'{se:.3f}':>9}")
    print(f"difference of means (vaelab - reference) {m_ours - m_ref:+.3f} (combined standard error "
          f"{combined:.3f}); paired difference against the loop {paired_m:+.4f} +- {paired_se:.4f}")

    full = None
    if not args.quick:
        start = time.perf_counter()
        values = log_likelihood(model, test_x, k=1000, seed=0)
        seconds = time.perf_counter() - start
        full = {"images": len(test_x), "k": 1000, "seconds": seconds, "nll": float(-values.mean())}
        print(f"whole test set: {len(test_x)} images at K=1000 in {seconds:.1f} s "
              f"({len(test_x) / seconds:.0f} images/s), NLL {full['nll']:.2f} nats")
    speedup = median[reference] / median["vaelab"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"data": name, "images": len(x), "k": args.k, "reference": reference,
                                   "seconds": median, "rounds": times, "speedup": speedup,
                                   "speedup_vs_loop": median["loop"] / median["vaelab"],
                                   "speedup_vs_no_grad_loop": median["loop, no_grad"] / median["vaelab"],
                                   "speedup_with_blas_matmuls": median[reference] / median["vaelab, BLAS matmuls"],
                                   "agree": agree, "mean_reference": m_ref, "mean_loop": m_loop,
                                   "mean_vaelab": m_ours, "full_test_set": full}, indent=2) + "\n")
    print(f"speedup={speedup:.2f} agree={'true' if agree else 'false'}")


if __name__ == "__main__":
    main()
