"""Helpers shared by the on-disk datasets: layout errors, folder scans, list files and seed-free splits.

Every reader fails with a one-line `UserError` naming what is missing or malformed and the expected layout.
Folders are listed once, at load time, in sorted order (class ids never depend on the filesystem's listing
order); images are only decoded later, in the DataLoader workers.

Every image file a dataset lists or finds must resolve, symlinks followed (os.path.realpath), inside the data root
or inside its dataset folder (`DataRoot`: the data root, and a dataset folder in it, may link to another disk), and
be a regular file: a list line `../../x.png`, a symlink to /etc/passwd or a FIFO in a data folder made by someone
else is refused at load time, before anything is written, in one line naming the list file and line (or the
file).
"""
from __future__ import annotations

import csv
import hashlib
import os
import stat

import numpy as np
from torchvision import transforms as T

from datasets.base import CLDataset, Splits, shown
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

    def scan(self, split_dir: str, classes: list[str], root: str, first_label: int = 0
             ) -> tuple[list[str], list[int]]:
        """Image files below `split_dir/<class>/` for each class (recursively, sorted: `image_files`); labels in
        class order."""
        paths, labels = [], []
        for label, cls in enumerate(classes, first_label):
            files = self.image_files(os.path.join(split_dir, cls), root)
            if not files:
                raise self.fail(f"class folder '{os.path.join(split_dir, cls)}' holds no images")
            paths += files
            labels += [label] * len(files)
        return paths, labels

    def folder_split(self, base: str, root: str, train: str = "train", test: str = "test",
                     expected: int | None = None, first_label: int = 0):
        """Train and test (paths, labels) and the class names of `base/{train,test}/<class>/`: one class map
        from the sorted train folders, which the test split must match."""
        classes = self.class_folders(os.path.join(base, train), expected)
        other = self.class_folders(os.path.join(base, test))
        if other != classes:
            odd = sorted(set(classes) ^ set(other))
            raise self.fail(f"'{os.path.join(base, test)}' and '{os.path.join(base, train)}' hold different class "
                            f"folders ({odd[0] if odd else 'order'} is in only one)")
        return (self.scan(os.path.join(base, train), classes, root, first_label),
                self.scan(os.path.join(base, test), classes, root, first_label), classes)

    def read_list(self, path: str, base: str, n_classes: int, root: str) -> tuple[list[str], list[int]]:
        """A list file of `<relative path> <label>` lines; paths are joined to `base` (a leading '/' is dropped,
        as the original's lists carry one) and must be existing files inside the data `root` or the dataset folder
        (`check_exist`); labels must lie in [0, n_classes)."""
        paths, labels, lines = [], [], []
        for number, line in self.text_lines(path):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            label = integer(parts[1]) if len(parts) == 2 else None
            if label is None:
                raise self.fail(f"{path} line {number} is not '<relative path> <label>'")
            paths.append(os.path.join(base, parts[0].strip().lstrip("/\\")))
            labels.append(label)
            lines.append(number)
        self.check_labels(labels, n_classes, path)
        self.check_exist(paths, path, root, lines)
        return paths, labels

    def text_lines(self, path: str) -> list[tuple[int, str]]:
        """The numbered lines of the UTF-8 text file `path` (a list or table file)."""
        self.need(path)
        try:
            with open(path, encoding="utf-8") as f:
                return list(enumerate(f, 1))
        except UnicodeDecodeError as err:
            raise self.fail(f"{path} is not UTF-8 text (byte {err.start})") from None

    def read_csv(self, path: str) -> list[list[str]]:
        """Rows of a UTF-8 CSV file (the header, if any, included; a byte-order mark dropped)."""
        self.need(path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                return [row for row in csv.reader(f) if row]
        except (UnicodeDecodeError, csv.Error) as err:
            raise self.fail(f"{path} is not a UTF-8 CSV file ({err})") from None

    def check_labels(self, labels, n_classes: int, source: str) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        bad = labels[(labels < 0) | (labels >= n_classes)]
        if len(bad):
            raise self.fail(f"{source} has label {bad[0]}, outside [0, {n_classes})")

    def check_exist(self, paths: list[str], source: str, root: str, lines: list[int] | None = None) -> None:
        """Every path listed in `source` (at line `lines[i]`, when given) resolves inside the data `root` or the
        dataset folder it lies in (`DataRoot`) and is an existing regular file."""
        data_root, missing = DataRoot(root), []
        for i, path in enumerate(paths):
            if "\0" in path:
                raise self.fail(f"{self.listed(path, source, lines, i)} holds a NUL character")
            real, regular, inside = data_root.locate(path)
            if not inside:
                raise self.outside(self.listed(path, source, lines, i), real, data_root)
            if not regular:
                missing.append(path)
        if missing:
            raise self.fail(f"{len(missing)} image(s) listed in {source} do not exist (first: {shown(missing[0])})")

    @staticmethod
    def listed(path: str, source: str, lines: list[int] | None, i: int) -> str:
        """Where the i-th of the paths `source` lists is, for a message: its line when known."""
        return f"line {lines[i]} of {source} ({shown(path)})" if lines else f"{shown(path)}, listed in {source},"

    def outside(self, where: str, real: str, data_root: "DataRoot") -> UserError:
        return UserError(f"{self.name}: {where} resolves to {shown(real)}, outside the data root "
                         f"{shown(data_root.root)} and its dataset folders; refused: no file outside them is read, not "
                         "even through a symlink (a data folder made by someone else must not make a run read other "
                         "files); move the file into the dataset folder")

    def check_classes(self, labels, n_classes: int, split: str) -> None:
        """Every class has at least one image in `split`."""
        absent = sorted(set(range(n_classes)) - set(labels))
        if absent:
            raise self.fail(f"class {absent[0]} has no {split} images ({len(absent)} classes without)")

    def image_files(self, folder: str, root: str) -> list[str]:
        """Image files below `folder` (`walk_images`: recursively, sorted, as os.walk finds them); [] when it does
        not exist. `folder` and every symlinked image must resolve inside the data `root` or the dataset folder
        (`DataRoot`), and every image must be a regular file (reading a FIFO would block forever). Costs one
        realpath per symlink: the listing itself says which entries are links."""
        data_root = DataRoot(root)
        real, _, inside = data_root.locate(folder)
        if os.path.isdir(folder) and not inside:
            raise self.outside(f"the folder {shown(folder)}", real, data_root)
        found = []
        for entry in walk_images(folder):
            if entry.is_symlink():
                real, _, inside = data_root.locate(entry.path)
                if not inside:
                    raise self.outside(f"the symlink {shown(entry.path)}", real, data_root)
            if not entry.is_file():
                raise self.fail(f"{shown(entry.path)} is not a regular file (a dangling symlink, a FIFO, a device?)")
            found.append(entry.path)
        return found


class DataRoot:
    """Where files resolve, every symlink followed (os.path.realpath), and whether that is inside the data root or
    inside the dataset folder they lie in (the data root's entry on their way, which may link to another disk, as
    may the data root itself). One realpath per distinct folder and one lstat per file: a list of a million
    images stays cheap."""

    def __init__(self, root: str):
        self.root, self.path = root, os.path.realpath(root)
        self._folders: dict[str, tuple[str, tuple[str, ...]]] = {}  # folder -> (resolved, prefixes allowed in it)

    def locate(self, path: str) -> tuple[str, bool, bool]:
        """(where `path` resolves, whether that is an existing regular file, whether it is inside)."""
        folder, name = os.path.split(path)
        if folder not in self._folders:
            self._folders[folder] = os.path.realpath(folder), self._allowed(folder)
        real_folder, allowed = self._folders[folder]
        real = os.path.normpath(os.path.join(real_folder, name))  # in a resolved folder '..' is lexical
        try:
            mode = os.lstat(real).st_mode
        except OSError:
            return real, False, real.startswith(allowed)
        if stat.S_ISLNK(mode):
            real = os.path.realpath(real)
            return real, os.path.isfile(real), real.startswith(allowed)
        return real, stat.S_ISREG(mode), real.startswith(allowed)

    def _allowed(self, folder: str) -> tuple[str, ...]:
        """The resolved data root, and the resolved dataset folder `folder` lies in (as written, '..' applied),
        each with a trailing separator; only the first when `folder` is not below the data root."""
        allowed = [os.path.join(self.path, "")]
        top = os.path.relpath(os.path.abspath(folder), os.path.abspath(self.root)).split(os.sep)[0]
        if top not in (os.curdir, os.pardir):
            allowed.append(os.path.join(os.path.realpath(os.path.join(self.root, top)), ""))
        return tuple(allowed)


def integer(text: str) -> int | None:
    """`text` (surrounding blanks aside) as an int when it is one in ASCII digits with an optional '-', else None
    (str.isdigit accepts '²', which int() refuses)."""
    text = text.strip()
    digits = text[1:] if text.startswith("-") else text
    return int(text) if digits.isascii() and digits.isdigit() else None


def walk_images(folder: str):
    """The directory entries of the image files below `folder` in os.walk's order (a folder's files, sorted, then
    its subfolders, sorted; symlinked subfolders not entered; hidden files skipped); nothing when `folder` does not
    exist. Iterative, so that a deep hostile tree cannot exhaust the stack."""
    pending = [folder]
    while pending:
        try:
            with os.scandir(pending.pop()) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:  # as os.walk: a folder that cannot be listed holds nothing
            continue
        subfolders = []
        for entry in entries:
            if entry.is_dir():  # a symlink to a folder is a folder here, as in os.walk, and is not entered
                if not entry.is_symlink():
                    subfolders.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith("."):
                yield entry
        pending += reversed(subfolders)


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
