"""User data: folder:PATH of PNG/JPEG images, npz:PATH and npy:PATH arrays (never unpickled)."""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image

from vaelab.data.dataset import Dataset, Split, check_finite, fixed_permutation, split_shuffled
from vaelab.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "P"}  # P: palettes are usually colour
_SHAPES = "(N, H, W), (N, C, H, W), (N, H, W, C) or flat (N, D)"
MAX_CLASSES = 2**16  # integer labels are class ids below this; a stray 10**12 must not allocate 10**12 class names
# what reading a member of a damaged or exotic zip can raise (RuntimeError: an encrypted member)
_ZIP_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


def load_folder(spec: str) -> Dataset:
    """Images directly in a folder (no labels) or in one sub-folder per class (labels = sorted folder names).

    Greyscale unless some image is in colour, then RGB for all; 8-bit pixels are scaled to [0, 1].
    """
    root = Path(spec).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"{root} {what}; pass folder:PATH with a folder of PNG/JPEG images")
    loose = _images_in(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labelled = {d.name: _images_in(d) for d in class_dirs}
    if loose or not any(labelled.values()):
        if not loose:
            raise DataError(
                f"no images found in {root} or its sub-folders; add {'/'.join(IMAGE_SUFFIXES)} files "
                "(directly, or in one sub-folder per class)"
            )
        if any(labelled.values()):
            raise DataError(
                f"{root} has both loose images (e.g. {loose[0].name}) and class sub-folders; "
                "move the loose images into a class folder, or the class folders' images up"
            )
        files, y, classes = loose, None, None
    else:
        empty = [name for name, found in labelled.items() if not found]
        if empty:
            raise DataError(
                f"class folder {root / empty[0]} has no {'/'.join(IMAGE_SUFFIXES)} images; "
                "add images to it or remove it"
            )
        classes = tuple(labelled)
        files = [f for found in labelled.values() for f in found]
        y = torch.tensor([i for i, found in enumerate(labelled.values()) for _ in found], dtype=torch.int64)
    x = torch.from_numpy(_read_images(files)).float().div_(255)
    return split_shuffled(f"folder:{spec}", x, y, classes)


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name so labels and splits are reproducible."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_images(files: list[Path]) -> np.ndarray:
    """Decode `files` into one uint8 array (N, C, H, W); all must share one size."""
    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        # Pillow's decoders raise many exception types on damaged bytes (OSError, SyntaxError, ValueError, ...).
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from None
    first = images[0]
    for path, im in zip(files, images):
        if im.size != first.size:
            raise DataError(
                f"images differ in size: {files[0]} is {first.size[0]}x{first.size[1]}, "
                f"{path} is {im.size[0]}x{im.size[1]} (width x height); resize them all to one size"
            )
    images = [_eight_bit(im) for im in images]
    mode = "RGB" if any(im.mode in _COLOUR_MODES for im in images) else "L"
    arrays = [np.asarray(im.convert(mode), dtype=np.uint8) for im in images]
    stacked = np.stack(arrays)  # (N, H, W) or (N, H, W, 3)
    return stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2)


def _eight_bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit grey images (16-bit PNGs open as I;16 or I) rescaled to 8 bits: Pillow's convert("L")
    would clip them at 255, turning almost every pixel white. 0..65535 maps to 0..255."""
    if im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")


def load_npz(spec: str) -> Dataset:
    """Arrays from an .npz: `x` (or `images`, or its only array) with optional `y`/`labels`, or pre-split
    `x_train`, `x_test` (optional `x_val`) with matching optional `y_*`. Pickled objects are refused."""
    path = _existing_file(spec, "npz")
    archive = _np_load(path)
    if isinstance(archive, np.ndarray):  # an .npy under another name: take it as unlabelled images
        return split_shuffled(f"npz:{spec}", to_images(archive, str(path)), None, None)
    with archive:
        keys = set(archive.files)
        source = f"npz:{spec}"
        if "x_train" in keys or "x_test" in keys:
            return _presplit(archive, keys, path, source)
        x_key = next((k for k in ("x", "images") if k in keys), None) or (next(iter(keys)) if len(keys) == 1 else None)
        if x_key is None:
            raise DataError(
                f"{path} has arrays {sorted(keys)}, none of them images; name the images x (labels y), "
                "or give x_train, x_test (and optional x_val) with matching y_train, y_test, y_val"
            )
        y_key = next((k for k in ("y", "labels") if k in keys), None)
        x = to_images(_array(archive, x_key, path), f"{path} [{x_key}]")
        y_raw = None if y_key is None else _array(archive, y_key, path)
    y, classes = (None, None) if y_raw is None else to_labels([y_raw], [len(x)], f"{path} [{y_key}]")
    return split_shuffled(source, x, None if y is None else y[0], classes)


def _presplit(archive: np.lib.npyio.NpzFile, keys: set[str], path: Path, source: str) -> Dataset:
    """A Dataset from x_train/x_test[/x_val] and matching y_* arrays; val is cut from train when absent."""
    missing = [k for k in ("x_train", "x_test") if k not in keys]
    if missing:
        raise DataError(f"{path} has no {missing[0]} array; pre-split files need both x_train and x_test")
    names = ["train", "test"] + (["val"] if "x_val" in keys else [])
    labelled = [f"y_{n}" in keys for n in names]
    if any(labelled) and not all(labelled):
        absent = [f"y_{n}" for n, has in zip(names, labelled) if not has]
        raise DataError(f"{path} has labels for some splits but no {absent[0]}; give labels for all or none")
    xs = {n: to_images(_array(archive, f"x_{n}", path), f"{path} [x_{n}]") for n in names}
    classes = None
    ys: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    if all(labelled):
        raw = [_array(archive, f"y_{n}", path) for n in names]
        labels, classes = to_labels(raw, [len(xs[n]) for n in names], f"{path} [y_*]")
        ys = dict(zip(names, labels))
    if "val" not in xs:  # hold out 10% of train, with the same fixed-seed shuffle as unsplit data
        n = len(xs["train"])
        if n < 2:
            raise DataError(f"{path} has {n} training example(s); give at least 2, or an x_val array")
        order, n_val = fixed_permutation(n), max(1, round(0.1 * n))
        parts = {"val": order[:n_val], "train": order[n_val:]}
        x_all, y_all = xs["train"], ys["train"]
        for name, idx in parts.items():
            xs[name], ys[name] = x_all[idx], None if y_all is None else y_all[idx]
    return Dataset(source, **{n: Split(xs[n], ys[n]) for n in ("train", "val", "test")}, classes=classes)


def load_npy(spec: str) -> Dataset:
    """One unlabelled image array from an .npy file, split 80/10/10 with a fixed seed."""
    path = _existing_file(spec, "npy")
    array = _np_load(path)
    if not isinstance(array, np.ndarray):
        array.close()
        raise DataError(f"{path} is an .npz archive, not a single array; pass npz:{spec}")
    return split_shuffled(f"npy:{spec}", to_images(array, str(path)), None, None)


def _existing_file(spec: str, kind: str) -> Path:
    """The path in `kind:spec`, which must be an existing file."""
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"{path} {what}; pass {kind}:PATH with an existing .{kind} file")
    return path


def _np_load(path: Path) -> np.ndarray | np.lib.npyio.NpzFile:
    """np.load without pickle; every failure becomes a DataError naming the file."""
    try:
        with path.open("rb") as f:
            magic = f.read(6)
            # Check the format ourselves: anything but .npy or zip could be a pickle, which np.load would try.
            if not magic.startswith((b"\x93NUMPY", b"PK")):
                raise DataError(
                    f"{path} is not an .npy or .npz file (pickles are never loaded); "
                    "save the arrays with numpy.save or numpy.savez"
                )
            if magic.startswith(b"\x93NUMPY"):
                f.seek(0)
                _check_npy_size(f, path.stat().st_size, str(path))
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # numpy refuses object arrays when allow_pickle=False
        raise DataError(
            f"{path} holds Python objects or an unreadable header ({e}); vaelab never unpickles, "
            "so save plain numeric arrays with numpy.save or numpy.savez"
        ) from None
    except _ZIP_ERRORS as e:
        raise DataError(f"cannot read {path} ({e}); save it with numpy.save or numpy.savez") from None
    except MemoryError:
        raise DataError(f"{path} holds more data than fits in memory; use a smaller array") from None


def _check_npy_size(stream: IO[bytes], size: int, source: str) -> None:
    """Refuse an .npy header that promises more bytes than there are: np.load would allocate them all first."""
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    except ValueError:
        return  # not a readable header: np.load says so itself
    needed = math.prod(shape) * dtype.itemsize
    if needed > size:
        raise DataError(
            f"{source} is truncated or damaged: its header promises shape {shape} of {dtype} ({needed:,} bytes), "
            f"but there are only {size:,}; save the array again with numpy.save or numpy.savez"
        )


def _array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """One array of an .npz, refusing pickled object arrays, members that are not .npy and lying headers."""
    member = key if key in archive.zip.namelist() else f"{key}.npy"  # the member NpzFile[key] reads
    try:
        with archive.zip.open(member) as stream:
            _check_npy_size(stream, archive.zip.getinfo(member).file_size, f"{path} [{key}]")
        array = archive[key]
    except ValueError as e:
        raise DataError(
            f"{path} [{key}] holds Python objects or an unreadable header ({e}); vaelab never unpickles, "
            "so save plain numeric arrays"
        ) from None
    except _ZIP_ERRORS as e:
        raise DataError(f"cannot read {path} [{key}] ({e}); the file is damaged, save it again") from None
    except MemoryError:
        raise DataError(f"{path} [{key}] holds more data than fits in memory; use a smaller array") from None
    if not isinstance(array, np.ndarray):  # NpzFile hands back the raw bytes of a member that is not .npy
        raise DataError(f"{path} [{key}] is not an .npy array; write the archive with numpy.savez")
    return array


def to_images(array: np.ndarray, source: str) -> torch.Tensor:
    """Turn a numeric array of any accepted layout into float32 (N, C, H, W); uint8 is scaled to [0, 1],
    other dtypes are kept as given (Gaussian likelihoods take any range).

    Args:
        array: (N, H, W), (N, C, H, W), (N, H, W, C) with C in {1, 3}, or flat (N, D) -> (N, 1, 1, D).
        source: the file (and key) it came from, quoted in errors.
    """
    if array.dtype.kind not in "biuf":
        raise DataError(f"{source} has dtype {array.dtype}, not numbers; save images as uint8 or float")
    if array.ndim not in (2, 3, 4) or array.size == 0:
        raise DataError(f"{source} has shape {array.shape}; give a non-empty array shaped {_SHAPES}")
    if array.ndim == 2:
        array = array[:, None, None, :]
    elif array.ndim == 3:
        array = array[:, None]
    elif array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # channels-last (N, H, W, C)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if array.dtype == np.uint8:
        x.div_(255)
    check_finite(x, source)  # float arrays are kept as given, so NaN/inf must be caught here
    return x


def to_labels(arrays: list[np.ndarray], counts: list[int], source: str) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    """Labels for one or more splits as int64 tensors, with class names shared by all splits.

    Args:
        arrays: 1-D integer (or integral float) labels, or strings (classes = their sorted unique values).
        counts: number of images each array must label.
        source: the file (and key) they came from, quoted in errors.
    """
    for array, count in zip(arrays, counts):
        if array.ndim != 1 or len(array) != count:
            raise DataError(
                f"{source} labels have shape {array.shape} for {count} images; give one label per image"
            )
    if all(a.dtype.kind in "US" for a in arrays):
        names = np.unique(np.concatenate(arrays))
        return [torch.from_numpy(np.searchsorted(names, a).astype(np.int64)) for a in arrays], tuple(map(str, names))
    for array in arrays:
        finite = array.dtype.kind == "f" and bool(np.all(np.isfinite(array)))
        integral = array.dtype.kind in "biu" or (finite and bool(np.all(np.mod(array, 1) == 0)))
        if not integral or (len(array) and (array.min() < 0 or array.max() >= MAX_CLASSES)):
            raise DataError(
                f"{source} labels must be integers >= 0 and below {MAX_CLASSES} (class ids), or strings; found "
                f"{array.dtype} values from {array.min()} to {array.max()}: number the classes 0, 1, 2, ..."
            )
    labels = [torch.from_numpy(a.astype(np.int64)) for a in arrays]
    n_classes = 1 + max(int(t.max()) for t in labels if len(t))
    return labels, tuple(str(i) for i in range(n_classes))
