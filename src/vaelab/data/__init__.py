"""Data sets as (N, C, H, W) float tensors: named sets, user folders and arrays, binarisation, value checks."""

from vaelab.data.custom import load_folder, load_npy, load_npz
from vaelab.data.dataset import (
    Dataset,
    Split,
    binarize,
    check_eight_bit,
    check_finite,
    check_unit_interval,
    dequantize,
    dequantize_held_out,
    fingerprint,
    static_binarize,
)
from vaelab.data.fetch import data_dir, download
from vaelab.data.idx import read_idx
from vaelab.data.registry import CUSTOM, DATASETS, DEFAULT_DATASET, load_dataset

__all__ = [
    "CUSTOM",
    "DATASETS",
    "DEFAULT_DATASET",
    "Dataset",
    "Split",
    "binarize",
    "check_eight_bit",
    "check_finite",
    "check_unit_interval",
    "data_dir",
    "dequantize",
    "dequantize_held_out",
    "download",
    "fingerprint",
    "load_dataset",
    "load_folder",
    "load_npy",
    "load_npz",
    "read_idx",
    "static_binarize",
]
