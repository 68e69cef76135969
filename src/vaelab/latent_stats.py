"""How a model uses its latent space: KL per dimension, active units, mutual information, linear probes."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution, kl_divergence

from .models.common import has_prior
from .system import in_eval_mode, model_device

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016, Sec. 5.2
# mutual_information_bounds scores every code against every posterior in chunks of at most this many (code, posterior,
# latent unit) triples: 2^24 floats, 64 MB per temporary whatever the latent size (a fixed 256 codes a chunk
# took 37 GB at a latent size of 100,000 and 0.5 GB per temporary at 256 units on 2,000 examples)
PAIR_ELEMENTS = 2**24


def _batches(model: nn.Module, x: torch.Tensor, batch_size: int = 1000):
    device = model_device(model)
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size].to(device)


@torch.no_grad()
@in_eval_mode
def codes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Point codes (N, D) on the CPU, model.embed's: posterior modes for a VAE (means of a Gaussian, mean
    directions of a vMF), the code for AE and PCA."""
    return torch.cat([model.embed(xb).cpu() for xb in _batches(model, x)])


@torch.no_grad()
@in_eval_mode
def posterior_means(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """E_q[z|x] (N, D) on the CPU for a model with a posterior (a vMF's lies inside the ball), else its codes."""
    if not has_prior(model):
        return codes(model, x)
    return torch.cat([model.encode(xb).mean.cpu() for xb in _batches(model, x)])


@torch.no_grad()
@in_eval_mode
def kl_per_unit(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Mean over x of the analytic KL per latent unit (Output.kl_units): per dimension of a factorised
    posterior, per group of a hierarchy, one value otherwise."""
    total = sum(model(xb).kl_units().sum(0) for xb in _batches(model, x))
    return (total / x.shape[0]).tolist()


@torch.no_grad()
def active_units(model: nn.Module, x: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> dict:
    """Dimensions u with Cov_x(E_q[z_u]) > threshold * Var_p(z_u) (Burda et al. 2016): the count and variances.

    Burda et al.'s threshold 0.01 is for a N(0, I) prior, whose coordinates have variance 1. It is scaled
    by the prior's variance per coordinate so that it means the same elsewhere: on the sphere S^(D-1)
    under the uniform prior each coordinate has variance 1/D, and even perfectly spread vMF means
    (length A(kappa) < 1) would rarely pass an unscaled 0.01 at D = 32.
    """
    variance = posterior_means(model, x).double().var(0, correction=int(x.shape[0] > 1))  # one code: not NaN
    prior_variance = getattr(model.prior(), "variance", None) if has_prior(model) else None
    scale = prior_variance.detach().double().cpu().flatten() if prior_variance is not None else 1.0
    return {"active_units": int((variance > threshold * scale).sum()), "active_unit_threshold": threshold,
            "posterior_mean_variance": variance.tolist()}


@torch.no_grad()
@in_eval_mode
def active_units_per_group(model: nn.Module, x: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> list[int]:
    """Active units of each latent group of a hierarchy (model.group_means): Cov_x(E_q[z_u]) > threshold.

    Lower groups have conditional priors, so Burda et al.'s unscaled threshold is used throughout.
    """
    means = [model.group_means(xb) for xb in _batches(model, x)]  # per batch: L tensors (B, s_l)
    return [int((torch.cat([m[g].cpu() for m in means]).double().var(0) > threshold).sum())
            for g in range(len(means[0]))]


@torch.no_grad()
def mutual_information(model: nn.Module, x: torch.Tensor, *, max_examples: int = 2000, seed: int = 0) -> float:
    """A lower bound on I(x; z) under q(z|x) p_data(x) from up to max_examples examples (nats): see
    mutual_information_bounds, whose "mutual_information" this is."""
    return mutual_information_bounds(model, x, max_examples=max_examples, seed=seed)["mutual_information"]


@torch.no_grad()
@in_eval_mode
def mutual_information_bounds(model: nn.Module, x: torch.Tensor, *, max_examples: int = 2000,
                              seed: int = 0) -> dict[str, float | int | None]:
    """Lower and upper bounds on I(x; z) under q(z|x) p_data(x) from N = min(len(x), max_examples) examples.

    I = E_x E_q(z|x)[log q(z|x) - log q(z)], and the aggregate posterior q(z) is the mixture of the
    examples' posteriors (Hoffman & Johnson 2016). One z_i ~ q(z|x_i) per example, scored against every
    posterior: with x_i's own in the mixture this is InfoNCE with the known q(z|x) as critic, a lower
    bound in expectation that cannot exceed log N, as He et al. 2019 and Zhu et al. 2020 compute it;
    without it (a mixture of the other N - 1) it is the leave-one-out upper bound (Poole et al. 2019,
    Sec. 2). The mean KL is an upper bound too: E_x KL(q(z|x) || p(z)) = I + KL(q(z) || p(z)) (Hoffman &
    Johnson 2016), and where the posteriors barely overlap it is much the tighter. A trained VAE's codes
    often sit at the ceiling log N, and then the true value is larger. The sampled bounds hold in
    expectation: near I = 0, or with few examples, a draw of either can fall a little below 0 or cross
    the other.

    Which upper bound is reported is chosen by a second, independent draw (the leave-one-out bound if that
    draw's is below the mean KL), so that the value reported still bounds I in expectation: the smaller of
    the two from one draw did not (the minimum of a noisy bound and an exact one is biased low: 42% below I
    near collapse at N = 200).

    Returns:
        "mutual_information": the lower bound; "mutual_information_upper": the upper bound chosen so (the mean
        KL where the leave-one-out bound is not finite; None if neither is: N = 1 and no analytic KL);
        "mutual_information_examples": N.
    """
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(x.shape[0], generator=g)[:max_examples]]
    device = model_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        qz = model.encode(x.to(device))  # batch (N,)
        lower, leave_one_out = _sampled_bounds(qz, qz.sample())  # one sample z_i ~ q(z|x_i) per example
        _, chooser = _sampled_bounds(qz, qz.sample())
        try:
            mean_kl = float(kl_divergence(qz, model.prior()).mean())
        except (AttributeError, NotImplementedError):  # no prior, or no analytic KL to it
            mean_kl = math.inf
    n = x.shape[0]
    upper = leave_one_out if chooser < mean_kl else mean_kl
    return {"mutual_information": lower, "mutual_information_upper": upper if math.isfinite(upper) else None,
            "mutual_information_examples": n}


def _sampled_bounds(qz: Distribution, z: torch.Tensor) -> tuple[float, float]:
    """InfoNCE's lower bound and the leave-one-out upper bound on I(x; z) from one code z_i ~ q(z|x_i) per
    example (inf for the second when N = 1)."""
    log_q_own = qz.log_prob(z)  # (N,)
    # log q(z_i | x_j) for all pairs, in rows of z: (rows, N), each from (rows, N, D) temporaries, or from matrix
    # products for a diagonal Gaussian
    n, rows = z.shape[0], max(1, PAIR_ELEMENTS // z[0].numel() // z.shape[0])
    pairwise = getattr(qz, "pairwise_log_prob", None)
    if pairwise is not None:
        rows = max(1, PAIR_ELEMENTS // n)
    log_mix, log_others = [], []
    for i in range(0, n, rows):
        pairs = pairwise(z[i:i + rows]) if pairwise is not None else qz.log_prob(z[i:i + rows, None])
        own = torch.arange(pairs.shape[0], device=pairs.device)
        # each code's own posterior, computed directly: the matrix products' expansion of the quadratic cancels
        # badly where sigma is tiny (0.1 nats off at sigma = 1e-6), and there the own term is the mixture's largest
        pairs = pairs.index_put((own, own + i), log_q_own[i:i + rows].to(pairs))
        log_mix.append(torch.logsumexp(pairs, 1))
        log_others.append(torch.logsumexp(pairs.index_put((own, own + i), pairs.new_tensor(-math.inf)), 1))
    lower = float((log_q_own - torch.cat(log_mix) + math.log(n)).mean())
    leave_one_out = float((log_q_own - torch.cat(log_others) + math.log(n - 1)).mean()) if n > 1 else math.inf
    return lower, leave_one_out


def linear_probes(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  model: nn.Module, *, max_train: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Test accuracy of logistic regression on the model's codes, on PCA features of equal size, and on pixels.

    The probes train on up to max_train training examples (a fixed-seed subset) with standardised
    features; scikit-learn's LogisticRegression (lbfgs). With fewer than two classes among those labels
    there is nothing to classify, and the result is {}.
    """
    from sklearn.decomposition import PCA as SkPCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(train_x.shape[0], generator=g)[:max_train]
    tx, ty = train_x[pick], train_y[pick].numpy()
    if len(np.unique(ty)) < 2:  # (a handful of images, or one class): LogisticRegression refuses
        return {}
    flat_train, flat_test = tx.flatten(1).double().numpy(), test_x.flatten(1).double().numpy()
    latent_dim = codes(model, tx[:1]).shape[1]
    features = {
        "latent": (codes(model, tx).double().numpy(), codes(model, test_x).double().numpy()),
        "pca": _pca_features(flat_train, flat_test, min(latent_dim, *flat_train.shape), SkPCA),
        "pixels": (flat_train, flat_test),
    }
    result = {}
    for name, (f_train, f_test) in features.items():
        scaler = StandardScaler().fit(f_train)
        f_train, f_test = scaler.transform(f_train), scaler.transform(f_test)
        if f_train.shape[1] > f_train.shape[0]:  # (a latent wider than the training set)
            f_train, f_test = _training_span(f_train, f_test)
        probe = LogisticRegression(max_iter=1000).fit(f_train, ty)
        result[f"probe_accuracy_{name}"] = float(probe.score(f_test, test_y.numpy()))
    result["probe_train_examples"] = int(len(pick))
    return result


def _training_span(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, d) with d > n as coordinates in an orthonormal basis V of their training rows' span (n, r),
    r <= n: an L2-penalised logistic regression's weights lie in that span (a part orthogonal to every
    training row adds to the penalty and to no prediction on them), so the fit on X V is the fit on X and
    scores X_test V alike, with n rather than d weights per class. V comes from the Gram matrix X X^T =
    U diag(lambda) U^T, V = X^T U diag(lambda)^-1/2: one (n, n) product, not an SVD of X."""
    eigenvalues, vectors = np.linalg.eigh(train @ train.T)
    keep = eigenvalues > eigenvalues[-1] * 1e-9
    root = np.sqrt(eigenvalues[keep])
    return vectors[:, keep] * root, (test @ train.T) @ vectors[:, keep] / root


def _pca_features(train: np.ndarray, test: np.ndarray, n: int, pca_class) -> tuple[np.ndarray, np.ndarray]:
    pca = pca_class(n_components=n, random_state=0).fit(train)
    return pca.transform(train), pca.transform(test)
