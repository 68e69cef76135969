"""log p(x) by importance sampling with the encoder as proposal: the IWAE bound with large K, fully batched.

    log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x),   z_k ~ q(z|x)      (Burda et al. 2016, eq. 8)

The bound tightens towards log p(x) as K grows. Work is done in (K_chunk, B, D) tensors: a batch of B
data points and a chunk of K_chunk samples per pass, with running log-sum-exps so that memory is bounded
for any K and every sample is used. Works for any model whose forward pass returns q(z|x), p(z) and
p(x|z) (objectives.log_weights), through the distributions' log_prob.

The reparameterisation noise of sample j of example i is drawn from a generator keyed by (seed, i,
draw), so an estimate depends on the seed alone: not on the chunk or batch size, nor on the device.
"""
from __future__ import annotations

import math
import numbers
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import check_finite, check_unit_interval
from .errors import InputError
from .models.common import has_prior, needs_unit_interval
from .objectives import log_weights
from .system import in_eval_mode, keep_freed_memory, model_device

MAX_ELEMENTS = 1 << 23  # parameters of p(x|z) materialised per pass (32 MiB of float32 logits)
DEFAULT_CHUNK = 200  # samples per pass: large enough for efficient matmuls, small enough to stay in cache
ESTIMATE_AFTER = 2.0  # seconds of sampling after which a run off a terminal estimates its whole time ...
LONG_RUN = 60.0  # ... and says it when it is longer than this
NOISE_BLOCK = 200  # samples of an example's noise drawn at a time (all K at once took K x batch x latent memory)
# (K below it is one block of K: 200 rows for K = 1 took 3.5x the memory and time)


def mean_and_stderr(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean of per-example values and its standard error, std / sqrt(n) (std with n - 1); nan for one value."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    return float(v.mean()), (float(v.std() / math.sqrt(n)) if n > 1 else float("nan"))


@dataclass(frozen=True)
class Estimate:
    """Per-example results of importance sampling.

    log_px: (N,) estimates of log p(x) (lower bounds in expectation), in nats
    ess:    (N,) effective sample size of the normalised weights, (sum w)^2 / sum w^2, in [1, K]
    k:      samples per example
    """

    log_px: torch.Tensor
    ess: torch.Tensor
    k: int

    def summary(self, n_dims: int | None = None, tokens: torch.Tensor | None = None) -> dict[str, float]:
        """nll_summary of the estimates, with K and the mean ESS."""
        ess = float(self.ess.double().mean())
        return {**nll_summary(self.log_px, n_dims, tokens), "nll_k": self.k, "ess_mean": ess,
                "ess_fraction": ess / self.k}


def nll_summary(log_px: torch.Tensor, n_dims: int | None = None,
                tokens: torch.Tensor | None = None) -> dict[str, float]:
    """Mean NLL in nats of per-example log p(x) with its standard error; divided by n_dims ln 2 for images
    (n_dims values each), or per token and as perplexity exp(sum NLL / sum tokens) for text.

    The division makes bits per dimension of discrete data, e.g. a Bernoulli model's binary pixels. A continuous
    density's NLL is of the pixels' scale, not bits: for 8-bit pixels scaled to [0, 1] and dequantised it becomes
    the images' bits/dim after adding log2(256) = 8 (evaluate_run does; README, Density estimation).
    """
    nll = -log_px.double()
    mean, stderr = mean_and_stderr(nll)
    result = {"nll": mean}
    if nll.numel() > 1:  # one test example has no standard error (its NaN reached evaluation.json and the report)
        result["nll_stderr"] = stderr
    if n_dims is not None:
        result["nll_bits_per_dim"] = mean / (n_dims * math.log(2))
    if tokens is not None:
        per_token = float(nll.sum() / tokens.double().sum())
        result.update(nll_per_token=per_token, perplexity=math.exp(per_token))
    return result


@dataclass
class KeyedNoise:
    """Standard normal noise for examples [first, first + batch) and K samples each, keyed by example.

    Draw number n of a forward pass (a hierarchical model draws once per latent group) gives each
    example samples j = 0, 1, ... in blocks of min(NOISE_BLOCK, K), block b from a CPU generator seeded by
    (seed, example index, n, b): a sample's noise depends on neither the chunk nor, from K = NOISE_BLOCK on,
    on K, and memory holds the blocks of one pass, for any K.
    """

    seed: int
    first: int
    batch: int
    k: int
    device: torch.device
    _blocks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def _block(self, n: int, b: int, event: tuple[int, ...]) -> torch.Tensor:
        """Samples b * size ... (b + 1) * size - 1 of draw n, (size, B, *event), size = min(NOISE_BLOCK, K)."""
        if (n, b) not in self._blocks:
            for key in [key for key in self._blocks if key[0] == n and key[1] < b]:  # passes go forwards in K
                del self._blocks[key]
            g = torch.Generator()
            per_example = []
            for i in range(self.first, self.first + self.batch):
                g.manual_seed(int(np.random.SeedSequence([self.seed, i, n, b]).generate_state(1)[0]))
                per_example.append(torch.randn((self.size, *event), generator=g))
            self._blocks[n, b] = torch.stack(per_example, 1).to(self.device)
        return self._blocks[n, b]

    def normal(self, n: int, event: tuple[int, ...], offset: int, count: int) -> torch.Tensor:
        """Samples offset ... offset + count - 1 of draw n, (count, B, *event)."""
        first, last = offset // self.size, (offset + count - 1) // self.size
        blocks = torch.cat([self._block(n, b, event) for b in range(first, last + 1)])
        start = offset - first * self.size
        return blocks[start:start + count]

    @property
    def size(self) -> int:
        """Samples per block."""
        return min(NOISE_BLOCK, self.k)

    def samples(self, offset: int) -> _NoiseView:
        """The noise of one forward pass over samples offset, offset + 1, ..."""
        return _NoiseView(self, offset)


@dataclass
class _NoiseView:
    source: KeyedNoise
    offset: int
    draws: int = 0

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise of shape (K_chunk, B, *event): samples offset .. offset + K_chunk of the next draw."""
        k_chunk, batch, *event = shape
        if batch != self.source.batch or self.offset + k_chunk > self.source.k:
            raise ValueError(f"noise for shape {shape} at sample {self.offset} is outside the keyed block")
        noise = self.source.normal(self.draws, tuple(event), self.offset, k_chunk)
        self.draws += 1
        return noise


def _sizes(n: int, outputs: int, k: int, chunk: int | None, batch_size: int | None) -> tuple[int, int]:
    if chunk is None:  # fewer samples per pass when even one example's would exceed the budget
        chunk = min(DEFAULT_CHUNK, max(1, MAX_ELEMENTS // outputs))
    chunk = max(1, min(k, chunk))
    batch_size = batch_size or max(1, MAX_ELEMENTS // (chunk * outputs))
    return chunk, max(1, min(n, batch_size))


@torch.no_grad()
def importance_sample(model: nn.Module, x: torch.Tensor, *, k: int = 5000, chunk: int | None = None,
                      batch_size: int | None = None, seed: int = 0, progress: bool = False) -> Estimate:
    """Importance-sampled log p(x) and effective sample sizes for images x (N, C, H, W).

    Args:
        model: a model with a latent posterior (forward(x, k=K) -> Output with qz, pz, z, px_z).
        x: data, on any device (moved batch by batch to the model's device).
        k: importance samples per example.
        chunk: samples per pass (default 200, fewer where one sample's outputs are large: a text VAE's
            vocabulary x length); K need not be a multiple of it.
        batch_size: data points per pass (default: as many as fit MAX_ELEMENTS pixels of p(x|z)).
        seed: the noise is keyed by (seed, example, sample), so a result depends on the seed alone;
            the global RNG is not touched.
        progress: a progress bar of the N x K samples on stderr, when it is a terminal (K = 5000 over 10,000
            images runs for minutes to hours); elsewhere (a log file, a pipe) one line with the time the whole
            estimate will take, when that is over a minute.
    """
    if not has_prior(model):  # PCA, autoencoders: no q(z|x) to sample from
        exact = "; PCA's log p(x) is exact: log_likelihood(model, x)" if hasattr(model, "log_marginal") else ""
        raise InputError(f"importance_sample: {type(model).__name__} models have no latent posterior and prior to "
                         f"sample from; log p(x) needs a VAE{exact}")
    k, seed = _whole("k", k, 1), _whole("seed", seed, 0, capped=False)
    chunk = None if chunk is None else _whole("chunk", chunk, 1)
    batch_size = None if batch_size is None else _whole("batch_size", batch_size, 1)
    _check_data(model, x, "importance_sample")
    device = model_device(model)
    if device.type == "cpu":
        keep_freed_memory()  # ~25% faster passes over large (K_chunk, B, pixels) tensors
    with tqdm(total=x.shape[0] * k, desc=f"log p(x), K={k}", unit="samples", unit_scale=True, leave=False,
              disable=None if progress else True, file=sys.stderr, dynamic_ncols=True) as bar:  # (None: a terminal's)
        return _importance_sample(model, x, k=k, chunk=chunk, batch_size=batch_size, seed=seed, device=device,
                                  bar=bar, estimate_time=progress and bool(bar.disable))


def _duration(seconds: float) -> str:
    """A time span in words: "40 s", "12 min", "3.5 h", "20 days", "1.2e+05 years"."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            value = seconds / size
            return f"{value:.2g} {unit}" if value >= 1e4 or value < 10 else f"{value:.0f} {unit}"
    return f"{seconds:.0f} s"


def _whole(name: str, value: object, lowest: int, capped: bool = True) -> int:
    """importance_sample's counts and seed as Python ints (NumPy's too), or a one-line InputError. Counts stay
    below 2**63, torch's largest size; a seed may be any size (numpy's SeedSequence takes it)."""
    top = 2**63 if capped else math.inf
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lowest <= value < top:
        limit = f"from {lowest} to 2**63 - 1" if capped else f">= {lowest}"
        raise InputError(f"importance_sample: {name} must be an integer {limit}, got {value!r}")
    return int(value)


def _check_data(model: nn.Module, x: torch.Tensor, where: str) -> None:
    """x as a log-density needs it: a non-empty tensor batch with values (not on the meta device), finite, and in
    [0, 1] for a Bernoulli likelihood; else a one-line InputError naming `where`."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{where}: x must be a non-empty batch of examples (N, ...) as a torch.Tensor, got {got}")
    if x.device.type == "meta":
        raise InputError(f"{where}: x is on the meta device, which holds shapes but no values; pass data on the CPU "
                         "or the model's device")
    if x.is_floating_point():  # a NaN or a grey value of 3 gives no density, only a number
        source, finite_fix = f"{where}: x", "log p(x) needs finite data"
        if needs_unit_interval(model):
            check_unit_interval(x, source, error=InputError, finite_fix=finite_fix,
                                fix="this model's Bernoulli likelihood is a density on [0, 1] (binary) data; "
                                    "rescale x to [0, 1]")
        else:
            check_finite(x, source, error=InputError, fix=finite_fix)


@in_eval_mode
def _importance_sample(model: nn.Module, x: torch.Tensor, *, k: int, chunk: int | None, batch_size: int | None,
                       seed: int, device: torch.device, bar: tqdm, estimate_time: bool = False) -> Estimate:
    # parameters of p(x|z) per sample: one per pixel, or one per token and vocabulary entry for text
    outputs = math.prod(x.shape[1:]) * (getattr(model, "vocab_size", None) or 1)
    chunk, batch_size = _sizes(x.shape[0], outputs, k, chunk, batch_size)
    passes, passes_done, start_time = -(-x.shape[0] // batch_size) * -(-k // chunk), 0, time.perf_counter()
    log_px, ess = [], []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        noise = KeyedNoise(seed=seed, first=start, batch=xb.shape[0], k=k, device=device)
        lse = torch.full((xb.shape[0],), -math.inf, device=device, dtype=torch.float64)
        lse2 = lse.clone()  # log sum w^2, for the effective sample size
        for done in range(0, k, chunk):
            out = model(xb, k=min(chunk, k - done), noise=noise.samples(done))
            log_w = log_weights(out, xb).double()  # (K_chunk, B)
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
            lse2 = torch.logaddexp(lse2, torch.logsumexp(2 * log_w, 0))
            bar.update(log_w.numel())
            passes_done += 1
            if estimate_time and (elapsed := time.perf_counter() - start_time) >= ESTIMATE_AFTER:
                estimate_time = False  # once: with no bar (off a terminal) a long run said nothing until done
                whole = elapsed * passes / passes_done
                if whole > LONG_RUN:
                    print(f"log p(x) with K={k} over {x.shape[0]} examples: about {_duration(whole)} at this rate "
                          f"(estimated after {_duration(elapsed)}; no progress bar off a terminal); the time "
                          "grows with K", file=sys.stderr, flush=True)
        log_px.append((lse - math.log(k)).float().cpu())
        ess.append(torch.exp(2 * lse - lse2).float().cpu())
    return Estimate(log_px=torch.cat(log_px), ess=torch.cat(ess), k=k)


def log_likelihood(model: nn.Module, x: torch.Tensor, k: int = 5000, chunk: int | None = None, *,
                   batch_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """Per-example log p(x) in nats, shape (N,): importance-sampled (see importance_sample), or for PCA exact
    (probabilistic PCA's Gaussian marginal; k, chunk, batch_size and seed unused)."""
    if hasattr(model, "log_marginal"):
        _check_data(model, x, "log_likelihood")
        return model.log_marginal(x.to(model_device(model))).float().cpu()
    return importance_sample(model, x, k=k, chunk=chunk, batch_size=batch_size, seed=seed).log_px
