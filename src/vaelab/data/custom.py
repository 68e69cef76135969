"""User data: folder:PATH of PNG/JPEG images, npz:PATH and npy:PATH arrays (never unpickled)."""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps

from vaelab.data.dataset import Dataset, Split, check_finite, fixed_permutation, split_shuffled
from vaelab.errors import DataError
from vaelab.system import note

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what Pillow reads
_SKIPPED_FOLDERS = ("__MACOSX",)  # what zip tools add beside the images (macOS resource forks)
_SHAPES = "(N, H, W), (N, C, H, W), (N, H, W, C) or flat (N, D)"
MAX_CLASSES = 2**16  # integer labels are class ids below this; a stray 10**12 must not allocate 10**12 class names
# what reading a member of a damaged or exotic zip can raise (RuntimeError: an encrypted member)
_ZIP_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


def load_folder(spec: str) -> Dataset:
    """Images directly in a folder (no labels) or in one sub-folder per class (labels = sorted folder names).

    Greyscale unless some image has a pixel in colour, then RGB for all (alpha dropped, as torchvision does);
    8-bit pixels are scaled to [0, 1]; EXIF orientation is applied, as image viewers do. Hidden files and
    folders are skipped; class folders with image folders inside them are refused rather than half read.
    """
    root = Path(spec).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"{root} {what}; pass folder:PATH with a folder of PNG/JPEG images")
    loose = _images_in(root)
    class_dirs = _folders_in(root)
    labelled = {d.name: _images_in(d) for d in class_dirs}
    for d in class_dirs:
        nested = next((sub for sub in _folders_in(d) if _images_in(sub)), None)
        if nested is not None:
            raise DataError(f"{nested} holds images inside class folder {d}; vaelab reads one level of class "
                            f"folders: move them up into {d.name}, or make {nested.name} a class folder of its own")
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
    pixels = _read_images(files)
    if pixels.max() == 1:
        _note_mask(str(root), "8-bit images", "save them with 0 and 255")
    return split_shuffled(f"folder:{spec}", torch.from_numpy(pixels).float().div_(255), y, classes)


def _note_mask(source: str, what: str, fix: str) -> None:
    """Note, once per file and process (rank 0's under torchrun), that 8-bit data of only 0 and 1 reads as 0 and
    1/255, as documented: a mask saved so was emptied by binarisation without a word."""
    note(f"{source} holds {what} of only 0 and 1, read as 8-bit pixels 0 and 1/255 (near black; binarised, almost "
         f"all 0); if they are 0/1 masks, {fix}", once=("mask", source))


def _hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name in _SKIPPED_FOLDERS  # .DS_Store, ._x.png, .thumbnails/


def _folders_in(folder: Path) -> list[Path]:
    """The sub-folders of `folder` that can be classes, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p))


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name so labels and splits are reproducible."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _hidden(p))


def _read_images(files: list[Path]) -> np.ndarray:
    """Decode `files` into one uint8 array (N, C, H, W); all must share one size."""
    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(ImageOps.exif_transpose(im))  # a copy, turned as the camera's EXIF tag says
        # Pillow's decoders raise many exception types on damaged bytes (OSError, SyntaxError, ValueError, ...).
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from None
        im = images[-1]
        # float images (TIFF mode F) and 32-bit integers beyond 16 bits have no fixed scale: Pillow's conversion
        # would clip them (floats in [0, 1] read as nearly black)
        lo, hi = im.getextrema() if im.mode == "I" else (0, 0)
        if im.mode == "F" or not 0 <= lo <= hi <= 65535:
            raise DataError(f"{path} holds {'float' if im.mode == 'F' else '32-bit integer'} pixels, which have no "
                            "fixed scale; save 8- or 16-bit images, or the pixels as an .npy array of floats")
    first = images[0]
    for path, im in zip(files, images):
        if im.size != first.size:
            raise DataError(
                f"images differ in size: {files[0]} is {first.size[0]}x{first.size[1]}, "
                f"{path} is {im.size[0]}x{im.size[1]} (width x height); resize them all to one size"
            )
    rgb = np.stack([np.asarray(_rgb(im), dtype=np.uint8) for im in images])  # (N, H, W, 3)
    # grey by content, not by mode: WebP has no grey mode, and PNG optimisers write grey images with palettes
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[None, ..., 0].transpose(1, 0, 2, 3)
    return rgb.transpose(0, 3, 1, 2)


def _rgb(im: Image.Image) -> Image.Image:
    """An image in 8-bit RGB, alpha dropped. 16- and 32-bit grey images (16-bit PNGs open as I;16 or I) are
    rescaled to 8 bits first: Pillow's convert would clip them at 255, turning almost every pixel white.
    0..65535 maps to 0..255."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA"):  # a palette with transparency goes through RGBA, as Pillow asks
        im = im.convert("RGBA")
    return im.convert("RGB")


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
            _refuse_unread(keys, {f"{v}_{n}" for v in "xy" for n in ("train", "val", "test")}, path)
            return _presplit(archive, keys, path, source)
        x_key = next((k for k in ("x", "images") if k in keys), None) or (
            next(iter(keys)) if len(keys) == 1 and not keys & {"y", "labels"} else None)
        if x_key is None:
            raise DataError(
                f"{path} has arrays {sorted(keys)}, none of them images; {_NPZ_NAMES}"
            )
        y_key = next((k for k in ("y", "labels") if k in keys), None)
        _refuse_unread(keys, {x_key, y_key}, path)
        x = to_images(_array(archive, x_key, path), f"{path} [{x_key}]")
        y_raw = None if y_key is None else _array(archive, y_key, path)
    y, classes = (None, None) if y_raw is None else to_labels([y_raw], [len(x)], f"{path} [{y_key}]")
    return split_shuffled(source, x, None if y is None else y[0], classes)


_NPZ_NAMES = ("name the images x (labels y), or give x_train, x_test (and optional x_val) with matching y_train, "
              "y_test, y_val")


def _refuse_unread(keys: set[str], read: set[str | None], path: Path) -> None:
    """Refuse arrays vaelab would not read (labels saved as `label`, a validation split as `x_valid`...): dropping
    them silently would train without the labels or split the user meant."""
    unread = sorted(keys - read)
    if unread:
        raise DataError(f"{path} has array(s) {unread} that vaelab does not read; {_NPZ_NAMES}, "
                        "and remove the others")


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
    raw_x = {n: _array(archive, f"x_{n}", path) for n in names}
    scales = {n: _SCALES.get(a.dtype, "kept as given") for n, a in raw_x.items()}
    other = next((n for n in names if scales[n] != scales["train"]), None)
    if other is not None:
        raise DataError(f"{path}: x_train is {raw_x['train'].dtype} ({scales['train']}) but x_{other} is "
                        f"{raw_x[other].dtype} ({scales[other]}), so the splits would be on different scales; "
                        "save every split with one dtype")
    xs = {n: to_images(raw_x[n], f"{path} [x_{n}]") for n in names}
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


def _channels_last(shape: tuple[int, ...]) -> bool:
    """Whether (N, A, B, C) images are (N, H, W, C): C grey or RGB and A not, or C with alpha (2, 4) and A no
    channel count at all; otherwise (N, C, H, W), which is also how ambiguous arrays like (N, 3, 3, 3) are read."""
    return shape[-1] in (1, 3) and shape[1] not in (1, 3) or shape[-1] in (2, 4) and shape[1] not in _CHANNELS


_SCALES = {np.dtype(np.uint8): "divided by 255", np.dtype(np.uint16): "divided by 65535"}  # as 8- and 16-bit PNGs
_CHANNELS = (1, 2, 3, 4)  # grey, grey + alpha, RGB, RGBA


def to_images(array: np.ndarray, source: str) -> torch.Tensor:
    """Turn a numeric array of any accepted layout into float32 (N, C, H, W). uint8 pixels are divided by 255 and
    uint16 by 65535; floats, booleans and integers that are all 0 or 1 are kept as given (Gaussian likelihoods
    take any range). Other integers are refused: int64 0..255 and int64 counts read alike.

    Args:
        array: (N, H, W), (N, C, H, W), (N, H, W, C) (see _channels_last), or flat (N, D) -> (N, 1, 1, D).
        source: the file (and key) it came from, quoted in errors.
    """
    if array.dtype.kind not in "biuf":
        raise DataError(f"{source} has dtype {array.dtype}, not numbers; save images as uint8 or float")
    if array.ndim not in (2, 3, 4) or array.size == 0:
        raise DataError(f"{source} has shape {array.shape}; give a non-empty array shaped {_SHAPES}")
    if array.dtype.kind in "iu" and array.dtype not in _SCALES:
        lo, hi = array.min(), array.max()
        if lo < 0 or hi > 1:
            raise DataError(f"{source} has {array.dtype} values from {lo} to {hi}; vaelab divides uint8 pixels by "
                            "255 and uint16 by 65535, and keeps floats as given: save 8-bit pixels as uint8 "
                            "(x.astype(numpy.uint8)), or as floats in the range you mean")
    if array.dtype == np.uint8 and array.max() == 1:
        _note_mask(source.split(" [")[0], "a uint8 array", "save it as bool or float (x.astype(numpy.float32))")
    if array.dtype.kind == "f" and array.dtype.itemsize > 4:
        finite = array[np.isfinite(array)]
        if finite.size and np.abs(finite).max() > np.finfo(np.float32).max:
            raise DataError(f"{source} has values up to {np.abs(finite).max():.3g}, beyond float32's range "
                            "(3.4e38), which vaelab computes in; rescale the data")
    if array.ndim == 2:
        array = array[:, None, None, :]
    elif array.ndim == 3:
        array = array[:, None]
    elif _channels_last(array.shape):
        array = array.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if array.dtype in _SCALES:
        x.div_(np.iinfo(array.dtype).max)
    check_finite(x, source)  # float arrays are kept as given, so NaN/inf must be caught here
    return x


def to_labels(arrays: list[np.ndarray], counts: list[int], source: str) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    """Labels for one or more splits as int64 tensors, with class names shared by all splits.

    Args:
        arrays: 1-D integer (or integral float) labels, or strings (classes = their sorted unique values).
        counts: number of images each array must label.
        source: the file (and key) they came from, quoted in errors.
    """
    arrays = [a.reshape(-1) if a.ndim == 2 and a.shape[1] == 1 else a for a in arrays]  # Keras-style (N, 1)
    arrays = [_decoded(a, source) if a.dtype.kind == "S" else a for a in arrays]
    if len({a.dtype.kind == "U" for a in arrays}) > 1:
        raise DataError(f"{source} labels are strings in some splits and numbers in others; give every split the "
                        "same kind of labels")
    for array, count in zip(arrays, counts):
        if array.ndim != 1 or len(array) != count:
            raise DataError(
                f"{source} labels have shape {array.shape} for {count} images; give one label per image"
            )
    if arrays[0].dtype.kind == "U":
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


def _decoded(array: np.ndarray, source: str) -> np.ndarray:
    """Byte-string labels (numpy's S dtype, e.g. from HDF5 or Python 2 pickles) as text, so classes read cat, not
    b'cat'."""
    try:
        return np.char.decode(array, "utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{source} labels are byte strings that are not UTF-8 text; save them as str") from None
