"""The Dataset value, value checks, binarisation and the fixed-seed split every loader shares."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from vaelab.errors import DataError, VaelabError

# Shuffling for splits uses its own seed so that a data set's splits never depend on a run's seed.
SPLIT_SEED = 20240611


@dataclass(frozen=True)
class Split:
    """One split: images (N, C, H, W) float32 and optional int64 labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor | None = None


@dataclass(frozen=True)
class Dataset:
    """A named data set with train/val/test splits that share one shape.

    Images: x is (N, C, H, W) float. Text: x is (N, T) int64 token ids padded with 0, and `vocab`
    lists the tokens (vocab[0] is the padding token).
    """

    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...] | None = None
    vocab: tuple[str, ...] | None = None
    # what prepare.prepare_data applied (binarisation, dequantisation, the seed of a static training split, and
    # whether it checked values in [0, 1]), so that data passed on prepared is not prepared again (dequantising
    # twice moves pixels); None: as loaded
    prepared_as: tuple[str, bool, int | None, bool] | None = None

    def __post_init__(self) -> None:
        """Refuse splits that disagree, so models can trust `shape` and labels."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        ndim, kind = (2, "token sequences (N, T)") if self.is_text else (4, "images (N, C, H, W)")
        for split_name, split in splits.items():
            if split.x.ndim != ndim or tuple(split.x.shape[1:]) != tuple(self.train.x.shape[1:]):
                raise DataError(
                    f"data set {self.name}: {split_name} split has shape {tuple(split.x.shape)}, train "
                    f"{tuple(self.train.x.shape)}; give every split {kind} of one shape"
                )
            if (split.y is None) != (self.train.y is None):
                raise DataError(
                    f"data set {self.name}: the {split_name} and train splits disagree on having labels; "
                    "give labels for every split or for none"
                )
            away = next((t.device for t in (split.x, split.y) if t is not None and t.device.type != "cpu"), None)
            if away is not None:  # (binarising with a CPU generator, probes through NumPy: deep torch errors)
                raise DataError(
                    f"data set {self.name}: the {split_name} split is on {away}; vaelab keeps data sets on the CPU "
                    "and moves batches to the run's device itself: give CPU tensors (x.cpu())"
                )
            if split.y is not None and len(split.y) != len(split.x):
                raise DataError(
                    f"data set {self.name}: the {split_name} split has {len(split.x)} images but "
                    f"{len(split.y)} labels; give one label per image"
                )

    @property
    def is_text(self) -> bool:
        """Whether the examples are token sequences rather than images."""
        return self.vocab is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image, or (T,) of one padded token sequence."""
        return tuple(int(s) for s in self.train.x.shape[1:])


def fingerprint(ds: Dataset) -> str:
    """The splits' sizes and a hash of their contents, "train/val/test:sha256-prefix": a run records it for data
    read from the user's files, which can change after training (rows reordered or added move images between the
    fixed splits), and later commands check it."""
    digest = hashlib.sha256()
    for split in (ds.train, ds.val, ds.test):
        for t in (split.x, split.y):
            if t is not None:
                digest.update(str(tuple(t.shape)).encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    digest.update(repr((ds.classes, ds.vocab)).encode())
    return f"{len(ds.train.x)}/{len(ds.val.x)}/{len(ds.test.x)}:{digest.hexdigest()[:16]}"


def check_finite(x: torch.Tensor, source: str, *, error: type[VaelabError] = DataError,
                 fix: str = "remove or replace them before training") -> None:
    """Raise `error` if `x` holds NaN or infinite values.

    Args:
        x: any floating tensor.
        source: what the tensor came from (a file, data set or argument), quoted in the message.
        error: the exception class (DataError for data sets; InputError for a tensor passed to a model's method).
        fix: what to do about it, ending the message.
    """
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise error(f"{source} has {bad} NaN or infinite value(s) out of {x.numel()}; {fix}")


UNIT_INTERVAL_FIX = ("rescale it to [0, 1] (e.g. save 8-bit pixels as uint8, which vaelab divides by 255) "
                     "or use a Gaussian likelihood")


def check_unit_interval(x: torch.Tensor, source: str, *, error: type[VaelabError] = DataError,
                        fix: str = UNIT_INTERVAL_FIX, finite_fix: str = "remove or replace them before training",
                        ) -> None:
    """Raise `error` unless every value of `x` is finite and in [0, 1] (needed by Bernoulli likelihoods).

    Args:
        x: any tensor.
        source: what the tensor came from (a file, data set or argument), quoted in the message.
        error: the exception class, as for check_finite.
        fix, finite_fix: what to do about values outside [0, 1] and about NaN or infinite values.
    """
    check_finite(x, source, error=error, fix=finite_fix)
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    if lo < 0 or hi > 1:
        raise error(f"{source} has values in [{float(lo):g}, {float(hi):g}], outside [0, 1]; {fix}")


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample Bernoulli(x) elementwise for x in [0, 1]; same dtype and device as x.

    Args:
        x: probabilities in [0, 1] (not checked here: this runs on every batch; see check_unit_interval).
        generator: optional torch.Generator on x's device, for reproducible samples.
    """
    # u < p with u ~ U[0, 1) is Bernoulli(p); about 3x faster than torch.bernoulli on CPU.
    return torch.empty_like(x).uniform_(generator=generator).lt_(x).to(x.dtype)


EIGHT_BIT_LEVELS = 256


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """8-bit pixels x = k/255 as (k + u)/256 with u ~ U[0, 1): spread uniformly over their bin of [0, 1].

    A continuous density p trained and scored on such values bounds the probability of the 8-bit image:
    log P(k) >= E_u[log p((k + u)/256)] - D log 256 (Uria et al. 2013; Theis et al. 2016, Sec. 3.1).

    Args:
        x: 8-bit pixel values in [0, 1] (checked once by check_eight_bit, not here: this runs every batch).
        generator: optional torch.Generator on x's device, for reproducible noise.
    """
    k = (x * (EIGHT_BIT_LEVELS - 1)).round_()
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    # k + u rounds up to k + 1 for u within half a float32 step of 1 (~1e-5 of draws at k >= 128): keep it below,
    # so every value stays inside its own bin; dividing by 256 is exact
    return torch.minimum(k + u, k + (1 - 2.0**-16)).div_(EIGHT_BIT_LEVELS)


def check_eight_bit(x: torch.Tensor, source: str) -> None:
    """Raise DataError unless every value of `x` is k/255 for an integer k in 0..255 (to float32 precision)."""
    check_unit_interval(x, source, fix="--dequantize needs 8-bit pixels k/255")
    if x.numel() == 0:
        return
    scaled = x.double() * (EIGHT_BIT_LEVELS - 1)
    off = float((scaled - scaled.round()).abs().max())
    if off > 1e-3:
        raise DataError(f"{source} has values that are not 8-bit levels k/255 (off by up to {off:.3g} of a "
                        "level); --dequantize is for 8-bit images (uint8 files, PNGs, IDX): drop it for other data")


def dequantize_held_out(ds: Dataset, seed: int) -> Dataset:
    """The validation and test splits dequantised once with `seed`, for comparable numbers (train is as given:
    the trainer draws new noise every batch)."""
    generator = torch.Generator(device=ds.val.x.device).manual_seed(seed)
    return replace(ds, val=Split(dequantize(ds.val.x, generator), ds.val.y),
                   test=Split(dequantize(ds.test.x, generator), ds.test.y))


def static_binarize(ds: Dataset, seed: int) -> Dataset:
    """Binarise every split once, with one generator seeded by `seed` (the fixed binarisation of the literature).

    Args:
        ds: a data set with values in [0, 1].
        seed: seed of the generator; the same seed gives the same binary data set.
    """
    generator = torch.Generator(device=ds.train.x.device).manual_seed(seed)
    splits = {}
    for split_name in ("train", "val", "test"):
        split: Split = getattr(ds, split_name)
        check_unit_interval(split.x, f"data set {ds.name} ({split_name} split)")
        splits[split_name] = Split(binarize(split.x, generator), split.y)
    return replace(ds, **splits)


def fixed_permutation(n: int) -> torch.Tensor:
    """A permutation of range(n) that depends only on n (seeded by SPLIT_SEED)."""
    return torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(n))


def split_shuffled(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor | None,
    classes: tuple[str, ...] | None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Dataset:
    """Shuffle with SPLIT_SEED and cut into train/val/test (each at least one example)."""
    n = len(x)
    if n < 3:
        raise DataError(f"{name} has {n} example(s); give at least 3 (one each for train, val and test)")
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    n_train = n - n_val - n_test
    order = fixed_permutation(n)
    cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    splits = {k: Split(x[i].contiguous(), None if y is None else y[i].contiguous()) for k, i in cuts.items()}
    return Dataset(name, classes=classes, **splits)
