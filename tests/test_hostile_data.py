"""Hostile image files and folders (issue 28): an image a run cannot use, or a file outside the data root, is
refused in one line naming the file, by a run (exit status 2) and by `python -m datasets.check` (a problem,
exit status 1) alike, never decoded into a traceback or trained on silently.

- a decompression bomb (more pixels than PIL's Image.MAX_IMAGE_PIXELS) is refused from its header, in well under
  a second;
- pixels of more than 8 bits: 16-bit images (I;16*, and PIL's 32-bit I filled on the 16-bit scale) are rescaled
  to 8 bits (value / 257), not clipped to white; float (F) and out-of-range I images are refused; 8-bit modes
  convert as before;
- list lines, table rows and symlinks that resolve outside the data root (and the dataset folder) are refused
  when the dataset is loaded, before a run folder exists; so are FIFOs and list files that are not text.

A file list or a folder is checked when the dataset loads, before anything is written; an image's content only
when it is decoded, in training: there the run folder already holds config.yaml and run.log (checking every
image's header at load time would cost one open per file; `python -m datasets.check` does that pass on demand).
"""
import os
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch._utils import ExceptionWrapper

import main
from dataset_fixtures import FIXTURES, bomb_png, image, skin8_lists, write_lines
from datasets import DATASETS
from datasets import check as dataset_check
from datasets.base import Pool, PoolView, read_image
from datasets.skin8 import Skin8
from test_robustness import fails, files, run_folders
from utils.registry import UserError

SKIN23 = ["--method", "finetune_il", "--dataset", "skin23", "--backbone", "resnet32", "--device", "cpu",
          "--img_size", "8", "--epochs", "1", "--init_cls", "23", "--seed", "1", "--batch_size", "64"]
#: the first training image of skin23's fixture (class 'Disease 00', in the first batch of the only task of SKIN23)
FIRST = os.path.join("skin23", "train", "Disease 00", "Disease 00_0.jpg")
SUPERSCRIPT_TWO = "\u00b2"  # str.isdigit() says yes, int() refuses it


def one_line(fn) -> str:
    """fn() must raise a one-line UserError; returns its message."""
    with pytest.raises(UserError) as err:
        fn()
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def pool_of(name: str, root, img_size: int = 16, split: str = "train", **keys):
    """The loaded dataset's train (or test) pool, per-sample path, and its items."""
    spec = DATASETS.get(name)(**keys)
    data = spec.load(str(root))
    x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
    return Pool(spec, x, y, img_size, batched=False), [str(p) for p in x]


def sample(pool: Pool, i: int) -> torch.Tensor:
    """Sample i as a run's test path returns it (no augmentation)."""
    return PoolView(pool, np.arange(len(pool.targets)), augment=False)[i][0]


def replace(path: str, write) -> str:
    """Replace the image at `path` by what write(path) writes, under the same name (a JPEG name for a PNG or TIFF
    is what a hostile folder would do; PIL reads the content, not the name)."""
    os.remove(path)
    write(path)
    return path


def main_fails(argv, data, capsys, tmp_path) -> tuple[str, float]:
    """main.cli over the data root `data` must exit 2 with one error line; returns it and the elapsed seconds."""
    start = time.perf_counter()
    line = fails([*argv, "--data_root", str(data)], capsys, tmp_path / "logs")
    return line, time.perf_counter() - start


def check_problems(name, data, **keys) -> str:
    """The problems `python -m datasets.check` reports (it must report some and exit 1)."""
    report = dataset_check.check(name, str(data), workers=2, **keys)
    assert not report.ok
    argv = [name, "--data_root", str(data)] + [f"--{k}={v}" for k, v in keys.items()]
    assert dataset_check.main(argv) == 1
    return "\n".join(report.problems)


# ---- decompression bombs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [20000, 10000], ids=["above-twice-the-limit", "between-once-and-twice"])
def test_a_decompression_bomb_is_refused_from_its_header(side, tmp_path):
    """20000^2 pixels: PIL raises DecompressionBombError (not an OSError); 10000^2: PIL only warns, and would
    decode 10^8 pixels. Both are one line naming the file within a second, with no warning printed."""
    FIXTURES["skin23"](str(tmp_path))
    pool, items = pool_of("skin23", tmp_path)
    bomb = replace(items[0], lambda p: bomb_png(p, side, side))
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        message = one_line(lambda: sample(pool, 0))
        elapsed = time.perf_counter() - start
    assert elapsed < 2.0 and bomb in message and "decompression-bomb limit" in message
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global setting is left alone
    assert sample(pool, 1).shape == (3, 16, 16)  # the other images still read
    start = time.perf_counter()
    assert bomb in check_problems("skin23", tmp_path)
    assert time.perf_counter() - start < 5.0


def test_the_limit_is_pils_as_the_user_set_it(tmp_path, monkeypatch):
    FIXTURES["skin23"](str(tmp_path))
    pool, items = pool_of("skin23", tmp_path)  # 8 x 8 images
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    assert sample(pool, 0).shape == (3, 16, 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 63)
    assert "limit of 63" in one_line(lambda: sample(pool, 0))
    with warnings.catch_warnings():  # PIL's warning printed, not raised: the header check refuses it all the same
        warnings.simplefilter("ignore")
        assert "8 x 8 pixels" in one_line(lambda: read_image(items[0]))


def test_a_bomb_in_training_is_exit_2_naming_the_file_within_seconds(tmp_path, capsys):
    FIXTURES["skin23"](str(tmp_path / "data"))
    bomb = replace(str(tmp_path / "data" / FIRST), lambda p: bomb_png(p, 20000, 20000))
    line, elapsed = main_fails(SKIN23, tmp_path / "data", capsys, tmp_path)
    assert line.startswith(f"error: image '{bomb}' ") and "decompression-bomb limit" in line
    assert elapsed < 5.0  # building the run included (about 1 s); the refusal itself takes < 2 s: the test above
    (run,) = run_folders(tmp_path / "logs")  # images are decoded in training: the run folder was opened, no more
    assert sorted(files(run)) == ["config.yaml", "run.log"]


def test_an_image_error_from_a_dataloader_worker_keeps_its_one_line(tmp_path):
    """With --num_workers the error reaches the main process as torch rebuilds it (its type called with the
    worker's traceback as text): it must still be a UserError whose last line is the message. (Through main.py
    with a real worker this holds too, but torch then spends 5 s shutting the worker down.)"""
    FIXTURES["skin23"](str(tmp_path))
    pool, items = pool_of("skin23", tmp_path)
    replace(items[0], lambda p: bomb_png(p, 20000, 20000))
    try:
        sample(pool, 0)
    except UserError as err:
        message, wrapper = str(err), ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(UserError) as err:
        wrapper.reraise()
    assert "Traceback" in str(err.value) and main._one_line(err.value) == message


# ---- pixels of more than 8 bits -----------------------------------------------------------------------------------

GRADIENT = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)  # black to white, 16 bits


def png_16(path):
    Image.fromarray(GRADIENT).save(path, format="PNG")  # PIL reads it back as I;16


def tiff_16_big_endian(path):
    Image.frombytes("I;16B", (16, 16), GRADIENT.astype(">u2").tobytes()).save(path, format="TIFF")


def pgm_16(path):
    with open(path, "wb") as f:  # PIL reads a 16-bit PGM as mode I, on the 16-bit scale
        f.write(b"P5\n16 16\n65535\n" + GRADIENT.astype(">u2").tobytes())


def with_first_image(write, mode, tmp_path, img_size):
    """A skin23 folder whose first test image `write` replaced (PIL reads it in `mode`); its test pool and items."""
    FIXTURES["skin23"](str(tmp_path))
    pool, items = pool_of("skin23", tmp_path, img_size=img_size, split="test")
    replace(items[0], write)
    with Image.open(items[0]) as img:
        assert img.mode == mode
    return pool, items


@pytest.mark.parametrize("write, mode", [(png_16, "I;16"), (tiff_16_big_endian, "I;16B"), (pgm_16, "I")])
def test_a_16_bit_image_is_rescaled_to_8_bits_not_saturated(write, mode, tmp_path):
    pool, items = with_first_image(write, mode, tmp_path, img_size=16)
    x = sample(pool, 0)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (pool.mean, pool.std))
    eight = np.round(GRADIENT / 257.0)  # 65535 -> 255, the relative intensities kept
    expected = torch.from_numpy(eight / 255.0).float().expand(3, 16, 16)
    torch.testing.assert_close(x * std + mean, expected, atol=1e-5, rtol=0)
    white = (x * std + mean >= 254.5 / 255).float().mean().item()
    assert white < 0.01  # a plain conversion clips 99% of these pixels to white
    report = dataset_check.check("skin23", str(tmp_path), workers=2)
    assert report.ok and items[0] in "\n".join(report.notes) and mode in "\n".join(report.notes)


def palette(path):
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 4).convert("P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 0] + [0] * 756)
    img.save(path, format="PNG", transparency=2)


def rgba(path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")  # RGBA: alpha dropped, colours kept, as before


def grey_alpha(path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 2), dtype=np.uint8)).save(path, format="PNG")


def bilevel(path):
    Image.fromarray(np.arange(64).reshape(8, 8) % 3 == 0).save(path, format="PNG")


def cmyk(path):
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("CMYK").save(
        path, format="JPEG")


@pytest.mark.parametrize("write, mode", [(palette, "P"), (rgba, "RGBA"), (grey_alpha, "LA"), (bilevel, "1"),
                                         (cmyk, "CMYK")])
def test_8_bit_modes_convert_as_pil_converts_them(write, mode, tmp_path):
    pool, items = with_first_image(write, mode, tmp_path, img_size=8)
    with Image.open(items[0]) as img:
        expected = pool.transforms[False](img.convert("RGB"))
    torch.testing.assert_close(sample(pool, 0), expected, atol=0, rtol=0)
    assert dataset_check.check("skin23", str(tmp_path), workers=2).notes == []


def float_tiff(path):
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(path, format="TIFF")


def int32_tiff(values):
    def write(path):
        Image.fromarray(np.full((8, 8), values, dtype=np.int32)).save(path, format="TIFF")
    return write


@pytest.mark.parametrize("write, why", [(float_tiff, "mode F"), (int32_tiff(-5), "mode I"),
                                        (int32_tiff(70000), "mode I")], ids=["float", "negative", "above-16-bit"])
def test_pixels_of_no_known_range_are_refused_in_one_line(write, why, tmp_path):
    FIXTURES["skin23"](str(tmp_path))
    pool, items = pool_of("skin23", tmp_path)
    replace(items[0], write)
    message = one_line(lambda: sample(pool, 0))
    assert items[0] in message and why in message
    assert items[0] in check_problems("skin23", tmp_path)


def test_a_float_image_in_training_is_exit_2_naming_the_file(tmp_path, capsys):
    FIXTURES["skin23"](str(tmp_path / "data"))
    path = replace(str(tmp_path / "data" / FIRST), float_tiff)
    line, _ = main_fails(SKIN23, tmp_path / "data", capsys, tmp_path)
    assert path in line and "mode F" in line


# ---- paths outside the data root ----------------------------------------------------------------------------------

def outside_file(tmp_path) -> str:
    """An image next to the data root `tmp_path/data`, which no list may reach."""
    return image(str(tmp_path / "outside_root.png"), 0)


def with_line(list_file: str, entry: str) -> int:
    """Append `<entry> 0` to the list file; returns its line number."""
    with open(list_file) as f:
        lines = f.read().splitlines()
    write_lines(list_file, [*lines, f"{entry} 0"])
    return len(lines) + 1


def skin8_entries(tmp_path):
    """The attacker's list lines, relative to <data>/ISIC2019, each reaching outside the data root."""
    base = str(tmp_path / "data" / "ISIC2019")
    link = os.path.join(base, "Data", "BKL", "link.jpg")
    os.symlink(outside_file(tmp_path), link)  # a symlink inside the data root, to a file outside it
    return {"parent": "../../outside_root.png", "passwd": os.path.relpath("/etc/passwd", base),
            "symlink": "Data/BKL/link.jpg"}


@pytest.mark.parametrize("case", ["parent", "passwd", "symlink"])
def test_a_list_line_outside_the_data_root_is_refused_at_load(case, tmp_path):
    train, test = skin8_lists(str(tmp_path / "data"))
    entry = skin8_entries(tmp_path)[case]
    number = with_line(train, entry)
    message = one_line(lambda: Skin8(train, test).load(str(tmp_path / "data")))
    assert f"line {number} of {train}" in message and entry in message and "outside the data root" in message
    assert train in check_problems("skin8", tmp_path / "data", train_list=train, test_list=test)


def test_an_absolute_list_path_stays_below_the_dataset_folder(tmp_path):
    """The original's lists start paths with '/': an absolute path is read below the dataset folder, so an
    existing file elsewhere is not found there, and the line is refused."""
    train, test = skin8_lists(str(tmp_path / "data"))
    outside = outside_file(tmp_path)
    with_line(train, outside)
    message = one_line(lambda: Skin8(train, test).load(str(tmp_path / "data")))
    below = os.path.join(tmp_path, "data", "ISIC2019", outside.lstrip("/"))
    assert train in message and "do not exist" in message and below in message


def test_a_list_line_outside_the_data_root_fails_the_run_before_its_folder(tmp_path, capsys):
    train, test = skin8_lists(str(tmp_path / "data"))
    number = with_line(train, "../../outside_root.png")
    outside_file(tmp_path)
    argv = ["--method", "finetune_il", "--dataset", "skin8", "--backbone", "resnet32", "--device", "cpu",
            "--img_size", "8", "--epochs", "1", "--init_cls", "8", "--train_list", train, "--test_list", test]
    line, _ = main_fails(argv, tmp_path / "data", capsys, tmp_path)
    assert f"line {number} of {train}" in line and "../../outside_root.png" in line
    assert not os.path.exists(tmp_path / "logs")  # nothing written


def other_lists(name, root) -> tuple[str, str]:
    """(the file of dataset `name`'s fixture that names image paths, a line or row that reaches outside the data
    root in its format)."""
    if name == "imagenet100":
        return os.path.join(root, "miniImageNet", "val.txt"), "/../../outside_root.png 0"
    if name == "skin40":
        return os.path.join(root, "SD-198", "main_classes_split", "val_1.txt"), "../../../outside_root.png 0"
    if name == "tinyimagenet":
        return (os.path.join(root, "tiny-imagenet-200", "val", "val_annotations.txt"),
                "../../../../outside_root.png\tn00000001\t0\t0\t8\t8")
    if name == "cub200":
        return os.path.join(root, "CUB_200_2011", "images.txt"), "1 ../../../outside_root.png"
    return (os.path.join(root, "ISIC2019", "ISIC_2019_Training_GroundTruth.csv"),  # skin8's ground truth
            "../../../outside_root,0.0,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0")


@pytest.mark.parametrize("name", ["imagenet100", "skin40", "tinyimagenet", "cub200", "skin8"])
def test_every_list_and_table_format_keeps_its_paths_inside(name, tmp_path):
    FIXTURES[name](str(tmp_path / "data"))
    outside_file(tmp_path)
    listing, line = other_lists(name, str(tmp_path / "data"))
    with open(listing) as f:
        rows = f.read().splitlines()
    write_lines(listing, [line] + rows[1:] if name == "cub200" else [*rows, line])
    message = one_line(lambda: DATASETS.get(name)().load(str(tmp_path / "data")))
    assert listing in message and "outside_root" in message and "outside the data root" in message


def test_symlinks_and_special_files_in_scanned_folders(tmp_path):
    """skin23 is found by scanning class folders: a symlinked image or class folder leading outside the data root
    is refused, and so is a FIFO (reading it would block forever); links that stay inside are read."""
    data = tmp_path / "data"
    FIXTURES["skin23"](str(data))
    train = data / "skin23" / "train"
    link = train / "Disease 01" / "extra.jpg"
    os.symlink(outside_file(tmp_path), link)
    message = one_line(lambda: DATASETS.get("skin23")().load(str(data)))
    assert str(link) in message and "outside the data root" in message
    assert str(link) in check_problems("skin23", data)
    os.remove(link)
    os.symlink(train / "Disease 02" / "Disease 02_0.jpg", link)  # inside: fine
    assert str(link) in DATASETS.get("skin23")().load(str(data)).train_x.tolist()
    os.remove(link)

    os.rename(train / "Disease 03", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", train / "Disease 03")
    assert str(train / "Disease 03") in one_line(lambda: DATASETS.get("skin23")().load(str(data)))
    os.remove(train / "Disease 03")
    os.rename(tmp_path / "elsewhere", train / "Disease 03")

    os.mkfifo(train / "Disease 04" / "pipe.jpg")
    message = one_line(lambda: DATASETS.get("skin23")().load(str(data)))
    assert str(train / "Disease 04" / "pipe.jpg") in message and "not a regular file" in message
    os.remove(train / "Disease 04" / "pipe.jpg")
    assert DATASETS.get("skin23")().load(str(data)).train_y.tolist() == np.repeat(np.arange(23), 2).tolist()


def test_a_symlinked_file_in_a_scanned_folder_fails_the_run_before_its_folder(tmp_path, capsys):
    FIXTURES["skin23"](str(tmp_path / "data"))
    link = str(tmp_path / "data" / FIRST)
    replace(link, lambda p: os.symlink(outside_file(tmp_path), p))
    line, _ = main_fails(SKIN23, tmp_path / "data", capsys, tmp_path)
    assert link in line and "outside the data root" in line
    assert not os.path.exists(tmp_path / "logs")


def test_a_linked_data_root_or_dataset_folder_is_read(tmp_path):
    """Links made by the user at the top: the data root, or a dataset folder in it, on another disk."""
    FIXTURES["skin23"](str(tmp_path / "disk"))
    os.symlink(tmp_path / "disk", tmp_path / "linked_root")
    assert len(DATASETS.get("skin23")().load(str(tmp_path / "linked_root")).train_x) == 46
    os.mkdir(tmp_path / "data")
    os.symlink(tmp_path / "disk" / "skin23", tmp_path / "data" / "skin23")
    assert len(DATASETS.get("skin23")().load(str(tmp_path / "data")).train_x) == 46
    train, test = skin8_lists(str(tmp_path / "disk8"))
    os.symlink(tmp_path / "disk8" / "ISIC2019", tmp_path / "data" / "ISIC2019")
    assert len(Skin8(train, test).load(str(tmp_path / "data")).train_x) == 16


# ---- list and table files that are not what they claim ------------------------------------------------------------

@pytest.mark.parametrize("content, why", [
    (b"\xff\xfe/val/n00000001/n00000001_0.JPEG 0\n", "not UTF-8 text"),
    (f"/val/n00000001/n00000001_0.JPEG {SUPERSCRIPT_TWO}\n".encode(), "line 1 is not"),
    (b"/val/n00000001/n00000001_0.JPEG --3\n", "line 1 is not"),
    (b"/val/n00000001/a\x00b.JPEG 0\n", "NUL character"),
])
def test_a_list_file_that_is_not_a_list_is_one_line(content, why, tmp_path):
    FIXTURES["imagenet100"](str(tmp_path))
    listing = os.path.join(tmp_path, "miniImageNet", "val.txt")
    with open(listing, "wb") as f:
        f.write(content)
    message = one_line(lambda: DATASETS.get("imagenet100")().load(str(tmp_path)))
    assert listing in message and why in message


def test_table_files_with_odd_numbers_are_one_line(tmp_path):
    FIXTURES["cub200"](str(tmp_path / "cub"))
    labels = os.path.join(tmp_path, "cub", "CUB_200_2011", "image_class_labels.txt")
    write_lines(labels, [f"{i} {SUPERSCRIPT_TWO if i == 3 else 1}" for i in range(1, 601)])
    assert "integer classes" in one_line(lambda: DATASETS.get("cub200")().load(str(tmp_path / "cub")))
    FIXTURES["skin7"](str(tmp_path / "skin7"))
    split = os.path.join(tmp_path, "skin7", "ISIC_2018_Classification", "split_data", "split_data_1_fold_test.csv")
    write_lines(split, ["image,label", f"ISIC_0000002,{SUPERSCRIPT_TWO}"])
    assert split in one_line(lambda: DATASETS.get("skin7")().load(str(tmp_path / "skin7")))
