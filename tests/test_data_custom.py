"""Data: user images in folders (folder:PATH) and arrays (npz:PATH, npy:PATH)."""

import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.data import load_dataset
from vaelab.errors import DataError

pytestmark = pytest.mark.usefixtures("offline_data")


def save_grey(path, value, size=(6, 4)):
    """A flat grey image of `size` (width, height) whose pixels all equal `value`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def all_splits(ds):
    return [ds.train, ds.val, ds.test]


# --- folder:PATH -------------------------------------------------------------------------------------------


def test_folder_without_classes(tmp_path):
    for i in range(10):
        save_grey(tmp_path / f"img{i}.png", 20 * i)
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.shape == (1, 4, 6) and ds.classes is None and ds.name == f"folder:{tmp_path}"
    assert [len(s.x) for s in all_splits(ds)] == [8, 1, 1] and all(s.y is None for s in all_splits(ds))
    values = sorted(round(float(s.x[i].mean()) * 255) for s in all_splits(ds) for i in range(len(s.x)))
    assert values == [20 * i for i in range(10)]  # every image once, scaled by 1/255
    assert torch.equal(load_dataset(f"folder:{tmp_path}").train.x, ds.train.x)  # fixed split


def test_folder_with_class_subfolders(tmp_path):
    # Pixel value encodes the class, so we can check labels stay with their images after shuffling.
    for label, name in enumerate(["cat", "dog", "emu"]):
        for i in range(4):
            save_grey(tmp_path / name / f"{i}.png", 100 * label)
    (tmp_path / "emu" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.classes == ("cat", "dog", "emu") and sum(len(s.x) for s in all_splits(ds)) == 12
    for split in all_splits(ds):
        assert split.y.dtype == torch.int64
        assert torch.allclose(split.x.mean((1, 2, 3)) * 255, 100 * split.y.float(), atol=1e-3)


def test_folder_colour_makes_all_rgb_and_jpeg_accepted(tmp_path):
    save_grey(tmp_path / "a.png", 10)
    save_grey(tmp_path / "b.png", 10)
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "c.JPG")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.shape == (3, 4, 6)


def test_folder_colour_channels_are_red_green_blue_in_that_order(tmp_path):
    """Only the number of channels was checked: images read as BGR (OpenCV's order) passed every test."""
    primaries = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for name, colour in primaries.items():
        for i in range(2):
            tmp_path.joinpath(name).mkdir(exist_ok=True)
            Image.new("RGB", (6, 4), colour).save(tmp_path / name / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.shape == (3, 4, 6)
    for split in all_splits(ds):
        for x, y in zip(split.x, split.y):
            expected = torch.tensor(primaries[ds.classes[y]], dtype=x.dtype) / 255  # channels 0, 1, 2 = R, G, B
            assert torch.equal(x.mean((1, 2)), expected), (ds.classes[y], x.mean((1, 2)))


def test_folder_16_bit_greys_are_rescaled_not_clipped(tmp_path):
    levels = [0, 257 * 64, 257 * 128, 65535]  # 16-bit PNGs of 0, 1/4, 1/2 and full scale
    for i, level in enumerate(levels):
        Image.fromarray(np.full((4, 6), level, dtype=np.uint16)).save(tmp_path / f"img{i}.png")
    assert Image.open(tmp_path / "img1.png").mode.startswith("I")  # (Pillow reads them as I;16 or I)
    save_grey(tmp_path / "img4.png", 192)  # mixed with an 8-bit one
    ds = load_dataset(f"folder:{tmp_path}")
    values = sorted(round(float(s.x[i].mean()) * 255) for s in all_splits(ds) for i in range(len(s.x)))
    assert values == [0, 64, 128, 192, 255]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match=r"no images found in .*\.png/\.jpg/\.jpeg"):
        load_dataset(f"folder:{tmp_path}")
    save_grey(tmp_path / "a.png", 1)
    save_grey(tmp_path / "b.png", 1, size=(5, 5))
    with pytest.raises(DataError) as info:
        load_dataset(f"folder:{tmp_path}")
    message = str(info.value)
    assert "a.png is 6x4" in message and "b.png is 5x5" in message and "resize" in message


def test_folder_corrupt_and_truncated_images(tmp_path):
    save_grey(tmp_path / "a.png", 1)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "bad.png").unlink()
    data = Image.effect_noise((64, 64), 50).convert("L")
    data.save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:200])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_loose_images_beside_classes_and_empty_class(tmp_path):
    save_grey(tmp_path / "cls" / "a.png", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty has no"):
        load_dataset(f"folder:{tmp_path}")
    save_grey(tmp_path / "empty" / "b.png", 1)
    save_grey(tmp_path / "loose.png", 1)
    with pytest.raises(DataError, match="loose images"):
        load_dataset(f"folder:{tmp_path}")


# --- npz:PATH and npy:PATH ---------------------------------------------------------------------------------


def digits_u8(n=20, h=5, w=4):
    """n uint8 images; image i is filled with 10 * i, so its pixels tell which one it was."""
    return np.broadcast_to((10 * np.arange(n)).astype(np.uint8)[:, None, None], (n, h, w)).copy()


def image_index(split):
    """Inverse of digits_u8 after scaling by 1/255."""
    return (split.x.mean((1, 2, 3)) * 255 / 10).round().long()


@pytest.mark.parametrize("x_key,y_key", [("x", "y"), ("images", "labels"), ("arr_0", None), ("x", None)])
def test_npz_single_array_layouts(tmp_path, x_key, y_key):
    x = digits_u8()
    arrays = {x_key: x} | ({y_key: np.arange(20) % 4} if y_key else {})
    np.savez(tmp_path / "d.npz", **arrays)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert ds.shape == (1, 5, 4) and [len(s.x) for s in all_splits(ds)] == [16, 2, 2]
    everything = torch.cat([image_index(s) for s in all_splits(ds)])
    assert sorted(everything.tolist()) == list(range(20))  # uint8 scaled by 1/255, every image once
    if y_key:
        assert ds.classes == ("0", "1", "2", "3")
        for split in all_splits(ds):
            assert torch.equal(split.y, image_index(split) % 4)
    else:
        assert ds.classes is None and ds.train.y is None


LAYOUTS = {  # name -> (C, H, W) of the images, and how to store canonical (N, C, H, W) images that way
    "NHW": ((1, 7, 6), lambda c: c[:, 0]),
    "NCHW": ((3, 7, 6), lambda c: c),
    "NCHW grey": ((1, 7, 6), lambda c: c),
    "NHWC": ((3, 7, 6), lambda c: c.transpose(0, 2, 3, 1)),
    "NHWC grey": ((1, 7, 6), lambda c: c.transpose(0, 2, 3, 1)),
    "flat": ((1, 1, 42), lambda c: c.reshape(len(c), -1)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_array_layouts(tmp_path, layout):
    shape, store = LAYOUTS[layout]
    # Image i holds 1000 * i + its position, so each loaded image can be checked element by element.
    canonical = (1000 * np.arange(10)[:, None] + np.arange(np.prod(shape))).reshape(10, *shape).astype(np.float32)
    np.save(tmp_path / "a.npy", store(canonical))
    ds = load_dataset(f"npy:{tmp_path / 'a.npy'}")
    assert ds.shape == shape and ds.train.y is None
    everything = torch.cat([s.x for s in all_splits(ds)])
    assert torch.equal(everything[everything[:, 0, 0, 0].argsort()], torch.from_numpy(canonical))


def test_float_arrays_are_kept_as_given(tmp_path):
    x = np.linspace(-3, 5, 10 * 16, dtype=np.float64).reshape(10, 4, 4)
    np.save(tmp_path / "g.npy", x)
    ds = load_dataset(f"npy:{tmp_path / 'g.npy'}")
    everything = torch.cat([s.x for s in all_splits(ds)])
    assert everything.dtype == torch.float32 and everything.min() == -3 and everything.max() == 5


def test_npz_presplit(tmp_path):
    x = digits_u8(30)
    y = np.arange(30) % 3
    splits = {"train": slice(0, 20), "val": slice(20, 24), "test": slice(24, 30)}
    np.savez(tmp_path / "s.npz", **{f"{v}_{k}": a[c] for k, c in splits.items() for v, a in (("x", x), ("y", y))})
    ds = load_dataset(f"npz:{tmp_path / 's.npz'}")
    assert [len(s.x) for s in all_splits(ds)] == [20, 4, 6] and ds.classes == ("0", "1", "2")
    assert torch.equal(ds.test.y, torch.from_numpy(y[24:]))
    assert torch.allclose(ds.test.x[:, 0] * 255, torch.from_numpy(x[24:]).float())


def test_npz_presplit_without_val_holds_out_part_of_train(tmp_path):
    x = digits_u8(30)
    np.savez(
        tmp_path / "s.npz",
        x_train=x[:20],
        x_test=x[20:],
    )
    ds = load_dataset(f"npz:{tmp_path / 's.npz'}")
    assert [len(s.x) for s in all_splits(ds)] == [18, 2, 10] and ds.train.y is None
    # the fewest training examples that leave one for validation: 2 is split 1 + 1, 1 is refused (untested before)
    np.savez(tmp_path / "two.npz", x_train=x[:2], x_test=x[20:])
    assert [len(s.x) for s in all_splits(load_dataset(f"npz:{tmp_path / 'two.npz'}"))] == [1, 1, 10]
    np.savez(tmp_path / "one.npz", x_train=x[:1], x_test=x[20:])
    with pytest.raises(DataError, match=r"one\.npz has 1 training example\(s\); give at least 2, or an x_val array"):
        load_dataset(f"npz:{tmp_path / 'one.npz'}")


def test_npz_string_labels(tmp_path):
    np.savez(tmp_path / "s.npz", x=digits_u8(6), y=np.array(["b", "a", "b", "c", "a", "a"]))
    ds = load_dataset(f"npz:{tmp_path / 's.npz'}")
    assert ds.classes == ("a", "b", "c")
    assert sorted(torch.cat([s.y for s in all_splits(ds)]).tolist()) == [0, 0, 0, 1, 1, 2]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_file(tmp_path, bad):
    x = np.zeros((5, 3, 3), np.float32)
    x[2, 1, 1] = bad
    np.savez(tmp_path / "nan.npz", x=x)
    with pytest.raises(DataError, match=r"nan\.npz.*NaN or infinite"):
        load_dataset(f"npz:{tmp_path / 'nan.npz'}")


def test_pickles_and_objects_are_refused(tmp_path):
    objects = np.array([{"a": 1}, None, 3], dtype=object)
    np.savez(tmp_path / "o.npz", x=objects)
    with pytest.raises(DataError, match=r"o\.npz.*Python objects"):
        load_dataset(f"npz:{tmp_path / 'o.npz'}")
    np.save(tmp_path / "o.npy", objects, allow_pickle=True)
    with pytest.raises(DataError, match=r"o\.npy.*Python objects"):
        load_dataset(f"npy:{tmp_path / 'o.npy'}")
    (tmp_path / "p.npz").write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    with pytest.raises(DataError, match=r"p\.npz is not an \.npy or \.npz file"):
        load_dataset(f"npz:{tmp_path / 'p.npz'}")


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"x": np.zeros((0, 3, 3), np.uint8)}, r"shape \(0, 3, 3\)"),
        ({"x": np.zeros(7, np.uint8)}, r"shape \(7,\)"),
        ({"x": np.zeros((2, 2, 2, 2, 2), np.uint8)}, "shape"),
        ({"x": np.array([["a", "b"]] * 4)}, "not numbers"),
        ({"x": np.zeros((2, 3, 3), np.uint8)}, "at least 3"),
        ({"x": np.zeros((5, 3, 3)), "y": np.arange(4)}, "one label per image"),
        ({"x": np.zeros((5, 3, 3)), "y": np.array([0, 1, -1, 0, 1])}, "integers >= 0"),
        ({"x": np.zeros((5, 3, 3)), "y": np.array([0, 1, 0.5, 0, 1])}, "integers >= 0"),
        ({"pictures": np.zeros((5, 3, 3)), "other": np.zeros(5)}, r"\['other', 'pictures'\]"),
        ({"x_train": np.zeros((5, 3, 3))}, "x_test"),
        ({"x_train": np.zeros((5, 3, 3)), "x_test": np.zeros((2, 3, 3)), "y_train": np.zeros(5, int)}, "y_test"),
        ({"x_train": np.zeros((5, 3, 3)), "x_test": np.zeros((2, 4, 4))}, "of one shape"),
    ],
)
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    assert "\n" not in str(info.value)


def test_missing_and_mismatched_array_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'none.npz'}")
    np.savez(tmp_path / "a.npz", x=digits_u8())
    with pytest.raises(DataError, match="pass npz:"):
        load_dataset(f"npy:{tmp_path / 'a.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match=r"junk\.npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


# --- what files hold, read as the user meant it (each of these was misread or a traceback before) ------------


def test_folder_skips_hidden_files_and_reads_other_formats(tmp_path):
    for i in range(3):
        save_grey(tmp_path / f"{i}.png", 10 * i)
    Image.new("L", (6, 4), 30).save(tmp_path / "3.bmp")
    Image.new("L", (6, 4), 40).save(tmp_path / "4.webp", lossless=True)
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / ".thumb.png")  # hidden: would make the set RGB
    (tmp_path / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork: unreadable
    (tmp_path / "__MACOSX").mkdir()
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.shape == (1, 4, 6) and ds.classes is None
    values = sorted(round(float(s.x[i].mean()) * 255) for s in all_splits(ds) for i in range(len(s.x)))
    assert values == [0, 10, 20, 30, 40]


def test_folder_applies_exif_orientation(tmp_path):
    top_row = np.zeros((4, 6), np.uint8)
    top_row[0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the top row shows as the right-hand column
    for i in range(3):
        Image.fromarray(top_row).save(tmp_path / f"{i}.png", exif=exif)
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.shape == (1, 6, 4)  # turned: 4 wide, 6 high
    assert torch.equal(ds.train.x[0, 0, :, -1], torch.ones(6)) and ds.train.x[0, 0, :, :-1].max() == 0


def test_folder_grey_palettes_stay_grey(tmp_path):
    for i in range(3):
        save_grey(tmp_path / f"{i}.png", 50 * i)
    Image.new("L", (6, 4), 200).convert("P").save(tmp_path / "p.png")  # what PNG optimisers write
    assert Image.open(tmp_path / "p.png").mode == "P"
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.shape == (1, 4, 6)
    Image.new("RGB", (6, 4), (200, 0, 0)).convert("P").save(tmp_path / "q.png")  # a colour palette: RGB
    assert load_dataset(f"folder:{tmp_path}").shape == (3, 4, 6)


def test_folder_refuses_image_folders_inside_class_folders(tmp_path):
    for name in ("cat", "dog"):
        for i in range(3):
            save_grey(tmp_path / name / f"{i}.png", i)
    save_grey(tmp_path / "cat" / "more" / "9.png", 9)
    with pytest.raises(DataError, match=r"more holds images inside class folder .*cat; .*move them up"):
        load_dataset(f"folder:{tmp_path}")


@pytest.mark.parametrize("shape,expected", [((10, 7, 6, 4), (4, 7, 6)), ((10, 7, 6, 2), (2, 7, 6)),
                                            ((10, 4, 4, 3), (3, 4, 4)), ((10, 3, 3, 3), (3, 3, 3)),
                                            ((10, 4, 7, 6), (4, 7, 6))])
def test_channels_last_with_alpha(tmp_path, shape, expected):
    np.save(tmp_path / "a.npy", np.zeros(shape, np.uint8))
    assert load_dataset(f"npy:{tmp_path / 'a.npy'}").shape == expected


def test_uint8_masks_of_0_and_1_are_read_as_pixels_with_one_note(tmp_path, capsys):
    """uint8 0/1 masks read as 0 and 1/255 (as documented), and binarising them emptied them without a word."""
    mask = (np.arange(40).reshape(10, 2, 2) % 2).astype(np.uint8)
    np.save(tmp_path / "mask.npy", mask)
    x = load_dataset(f"npy:{tmp_path / 'mask.npy'}").train.x
    assert torch.equal(x.unique(), torch.tensor([0.0, 1 / 255]))
    err = capsys.readouterr().err
    assert "mask.npy holds a uint8 array of only 0 and 1, read as 8-bit pixels 0 and 1/255" in err
    assert "save it as bool or float" in err
    np.savez(tmp_path / "split.npz", x_train=mask, x_test=mask[:4])
    for _ in range(2):  # once per file, not per split or per load
        load_dataset(f"npz:{tmp_path / 'split.npz'}")
    assert capsys.readouterr().err.count("split.npz holds") == 1
    for i, image in enumerate(mask):  # a folder of 0/1 PNG masks, as image tools save them
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    load_dataset(f"folder:{tmp_path}")
    assert f"{tmp_path} holds 8-bit images of only 0 and 1" in capsys.readouterr().err
    np.save(tmp_path / "pixels.npy", (np.arange(40).reshape(10, 2, 2) * 6).astype(np.uint8))
    load_dataset(f"npy:{tmp_path / 'pixels.npy'}")
    assert "note" not in capsys.readouterr().err


def test_integer_dtypes(tmp_path):
    np.save(tmp_path / "u16.npy", np.full((10, 2, 2), 65535, np.uint16))
    assert torch.equal(load_dataset(f"npy:{tmp_path / 'u16.npy'}").train.x, torch.ones(8, 1, 2, 2))
    np.save(tmp_path / "binary.npy", np.arange(40).reshape(10, 2, 2) % 2)  # int64 0/1: kept as given
    assert set(load_dataset(f"npy:{tmp_path / 'binary.npy'}").train.x.unique().tolist()) == {0.0, 1.0}
    np.save(tmp_path / "i64.npy", np.arange(40).reshape(10, 2, 2) * 6)  # int64 0..234: pixels or counts?
    with pytest.raises(DataError, match=r"int64 values from 0 to 234; .*x\.astype\(numpy\.uint8\)"):
        load_dataset(f"npy:{tmp_path / 'i64.npy'}")
    np.save(tmp_path / "huge.npy", np.full((5, 2, 2), 1e300))
    with pytest.raises(DataError, match="beyond float32's range"):
        load_dataset(f"npy:{tmp_path / 'huge.npy'}")


def test_npz_arrays_that_would_not_be_read_are_refused(tmp_path):
    x = digits_u8()
    for arrays, unread in [({"x": x, "label": np.arange(20)}, "['label']"),
                           ({"x_train": x[:12], "x_valid": x[12:16], "x_test": x[16:]}, "['x_valid']"),
                           ({"x_train": x[:16], "x_test": x[16:], "x": x}, "['x']"),
                           ({"labels": np.arange(20)}, "none of them images")]:
        np.savez(tmp_path / "a.npz", **arrays)
        with pytest.raises(DataError, match=re.escape(unread)):
            load_dataset(f"npz:{tmp_path / 'a.npz'}")


def test_npz_splits_in_different_dtypes_are_refused(tmp_path):
    x = digits_u8()
    np.savez(tmp_path / "a.npz", x_train=x[:16], x_test=x[16:].astype(np.float32))
    with pytest.raises(DataError, match=r"x_train is uint8 \(divided by 255\) but x_test is float32 \(kept as"):
        load_dataset(f"npz:{tmp_path / 'a.npz'}")


def test_label_forms(tmp_path):
    x = digits_u8(6)
    np.savez(tmp_path / "col.npz", x=x, y=(np.arange(6) % 2)[:, None])  # Keras-style (N, 1)
    assert load_dataset(f"npz:{tmp_path / 'col.npz'}").classes == ("0", "1")
    np.savez(tmp_path / "bytes.npz", x=x, y=np.array([b"cat", b"dog"] * 3))
    assert load_dataset(f"npz:{tmp_path / 'bytes.npz'}").classes == ("cat", "dog")
    np.savez(tmp_path / "mixed.npz", x_train=x[:4], y_train=np.array(["a"] * 4), x_test=x[4:], y_test=np.arange(2))
    with pytest.raises(DataError, match="strings in some splits and numbers in others"):
        load_dataset(f"npz:{tmp_path / 'mixed.npz'}")
