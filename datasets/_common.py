"""Helpers shared by the on-disk datasets: layout errors, folder scans, list files and seed-free splits.

Every reader fails with a one-line `UserError` naming what is missing or malformed and the expected layout.
Folders are listed once, at load time, in sorted order (class ids never depend on the filesystem's listing
order); images are only decoded later, in the DataLoader workers.
"""
from __future__ import annotations

import csv
import hashlib
import os

import numpy as np
from torchvision import transforms as T

from datasets.base import CLDataset, Splits
from utils.registry import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: normalisations of the original code
SKIN_NORM = (0.603, 0.489, 0.463), (0.260, 0.241, 0.244)
IMAGENET_R_NORM = (0.480, 0.448, 0.398), (0.230, 0.227, 0.226)


class LayoutError(UserError):
    """A dataset folder that is missing or malformed; the message ends with the expected layout."""

    def __init__(self, name: str, problem: str, layout: str):
        super().__init__(f"{name}: {problem}; expected {layout} under data_root (or $DATA); nothing is downloaded")


class DiskDataset(CLDataset):
    """A dataset read from files: `folder` under the data root, described by the one-line `layout`."""

    use_path = True
    folder: str
    layout: str

    def fail(self, problem: str) -> LayoutError:
        return LayoutError(self.name, problem, self.layout)

    @property
    def name(self) -> str:
        """The registered name (for messages)."""
        from datasets import DATASETS

        return next((k for k in DATASETS.keys() if DATASETS.get(k) is type(self)), type(self).__name__)

    def need(self, path: str, kind: str = "file") -> str:
        """`path` itself, or a layout error when it is not an existing file (or folder)."""
        ok = os.path.isdir(path) if kind == "folder" else os.path.isfile(path)
        if not ok:
            raise self.fail(f"{kind} '{path}' not found")
        return path

    def class_folders(self, split_dir: str, expected: int | None = None) -> list[str]:
        """Sorted names of the class folders in `split_dir`; their number must be `expected` when given."""
        self.need(split_dir, "folder")
        names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
        if expected is not None and len(names) != expected:
            raise self.fail(f"'{split_dir}' holds {len(names)} class folders, expected {expected}")
        return names

    def scan(self, split_dir: str, classes: list[str], first_label: int = 0) -> tuple[list[str], list[int]]:
        """Image files below `split_dir/<class>/` for each class (recursively, sorted); labels in class order."""
        paths, labels = [], []
        for label, cls in enumerate(classes, first_label):
            files = image_files(os.path.join(split_dir, cls))
            if not files:
                raise self.fail(f"class folder '{os.path.join(split_dir, cls)}' holds no images")
            paths += files
            labels += [label] * len(files)
        return paths, labels

    def folder_split(self, base: str, train: str = "train", test: str = "test", expected: int | None = None,
                     first_label: int = 0):
        """Train and test (paths, labels) and the class names of `base/{train,test}/<class>/`: one class map
        from the sorted train folders, which the test split must match."""
        classes = self.class_folders(os.path.join(base, train), expected)
        other = self.class_folders(os.path.join(base, test))
        if other != classes:
            odd = sorted(set(classes) ^ set(other))
            raise self.fail(f"'{os.path.join(base, test)}' and '{os.path.join(base, train)}' hold different class "
                            f"folders ({odd[0] if odd else 'order'} is in only one)")
        return (self.scan(os.path.join(base, train), classes, first_label),
                self.scan(os.path.join(base, test), classes, first_label), classes)

    def read_list(self, path: str, base: str, n_classes: int) -> tuple[list[str], list[int]]:
        """A list file of `<relative path> <label>` lines; paths are joined to `base` (a leading '/' is dropped,
        as the original's lists carry one) and must exist; labels must lie in [0, n_classes)."""
        self.need(path)
        paths, labels = [], []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rsplit(maxsplit=1)
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise self.fail(f"{path} line {number} is not '<relative path> <label>'")
                paths.append(os.path.join(base, parts[0].strip().lstrip("/\\")))
                labels.append(int(parts[1]))
        self.check_labels(labels, n_classes, path)
        self.check_exist(paths, path)
        return paths, labels

    def read_csv(self, path: str) -> list[list[str]]:
        """Rows of a CSV file (the header, if any, included)."""
        self.need(path)
        with open(path, newline="") as f:
            return [row for row in csv.reader(f) if row]

    def check_labels(self, labels, n_classes: int, source: str) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        bad = labels[(labels < 0) | (labels >= n_classes)]
        if len(bad):
            raise self.fail(f"{source} has label {bad[0]}, outside [0, {n_classes})")

    def check_exist(self, paths: list[str], source: str) -> None:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise self.fail(f"{len(missing)} image(s) listed in {source} do not exist (first: {missing[0]})")

    def check_classes(self, labels, n_classes: int, split: str) -> None:
        """Every class has at least one image in `split`."""
        absent = sorted(set(range(n_classes)) - set(labels))
        if absent:
            raise self.fail(f"class {absent[0]} has no {split} images ({len(absent)} classes without)")


def image_files(folder: str) -> list[str]:
    """Image files below `folder` (recursively, hidden files skipped), sorted; [] when it does not exist."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(parent, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def stable_order(keys: list[str]) -> list[str]:
    """`keys` sorted by the SHA-1 of each key: a fixed pseudo-random order that needs no seed and does not
    change when other keys are added or removed."""
    return sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())


def held_out(n: int, test: float, total: float) -> int:
    """Test images out of `n` for the ratio test/total: at least one test and one train image when n >= 2."""
    return min(max(1, round(n * test / total)), n - 1) if n >= 2 else 0


def folder_names(paths: list[str], labels: list[int], n_classes: int) -> list[str]:
    """Class names for list-file datasets: the parent folder of each class's first image (else the label)."""
    names = [str(c) for c in range(n_classes)]
    for path, label in zip(reversed(paths), reversed(labels)):
        names[label] = os.path.basename(os.path.dirname(path)) or names[label]
    return names


def splits(train: tuple[list[str], list[int]], test: tuple[list[str], list[int]], names) -> Splits:
    """Path lists and labels as the arrays `Splits` holds."""
    return Splits(np.asarray(train[0]), np.asarray(train[1], dtype=np.int64), np.asarray(test[0]),
                  np.asarray(test[1], dtype=np.int64), list(names) if names is not None else None)


class SkinDataset(DiskDataset):
    """The original's dermatology datasets: 224 px, horizontal flip, its skin normalisation."""

    img_size = 224
    mean, std = SKIN_NORM

    def train_augment(self):
        return [T.RandomHorizontalFlip()]
