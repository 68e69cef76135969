"""Data set names -> loaders: a plain dict for the named sets, prefixes for user data."""

from __future__ import annotations

from collections.abc import Callable

from vaelab.data.custom import load_folder, load_npy, load_npz
from vaelab.data.dataset import Dataset
from vaelab.data.sources import load_digits, load_fashion_mnist, load_mnist, load_mnist5k
from vaelab.data.text import load_fortunes
from vaelab.errors import DataError

DEFAULT_DATASET = "mnist5k"

DATASETS: dict[str, Callable[[], Dataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "fortunes": load_fortunes,
}

# "folder:PATH", "npz:PATH", "npy:PATH" -> loader(PATH)
CUSTOM: dict[str, Callable[[str], Dataset]] = {"folder": load_folder, "npz": load_npz, "npy": load_npy}


def load_dataset(name: str) -> Dataset:
    """Load a named data set or user data given as folder:PATH, npz:PATH or npy:PATH.

    Args:
        name: a key of DATASETS, or one of the prefixed forms.
    """
    if not isinstance(name, str):
        raise DataError(f"a data set is named by a string such as 'digits' or 'npz:PATH', got {type(name).__name__}")
    prefix, colon, path = name.partition(":")
    if colon and prefix in CUSTOM:
        if not path:
            raise DataError(f"data set {name!r} names no path; write {prefix}:PATH")
        return CUSTOM[prefix](path)
    if name in DATASETS:
        return DATASETS[name]()
    raise DataError(
        f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, "
        f"or {', '.join(f'{p}:PATH' for p in CUSTOM)}"
    )
