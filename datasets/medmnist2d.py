"""MedMNIST v2 (Yang et al., Scientific Data 2023): every 2D subset, registered under the package's flag.

The subsets (pathmnist, chestmnist, dermamnist, octmnist, pneumoniamnist, retinamnist, breastmnist, bloodmnist,
tissuemnist, organamnist, organcmnist, organsmnist) are generated from the installed `medmnist` package: its
`INFO` table gives the flags, class names and counts, its dataset classes tell 2D from 3D subsets.

Files: `<root>/medmnist/<flag>.npz` (28 px) or `<flag>_<size>.npz` (64, 128, 224 px), the files the package's
download writes. They are read directly with numpy (keys `train_images`, `train_labels`, `test_images`,
`test_labels`): the package's Dataset class asserts the official sample counts and may download, so it can load
neither a subset nor a test fixture, and it is never called. With several sizes present the smallest is used
(keep only the file you want); the default img_size is the files' size. The official train/test splits are
used and val is ignored, as in the original. Grayscale images are repeated to 3 channels (uint8 in memory).

Labels: as given for the multi-class, binary and ordinal subsets. ChestMNIST is multi-label (14 findings): only
its images with exactly one finding are kept, labelled by that finding, since class-incremental learning needs
one label per image (a deviation; no original config used it).

Transforms: the original's MedMNIST ones, RandomCrop(size, padding size/7, i.e. 4 at 28 px) + horizontal flip,
CIFAR-100 normalisation. Deviations: the original cropped 28-px images to 32 px (a bug); we crop at the native
size. Subsets whose classes name left and right organs (organamnist, organcmnist, organsmnist) are not flipped,
as a flip swaps those labels. Default tasks: 2 classes each, the first task taking the odd class; 1 + 1 for the
binary subsets.
"""
import os
import re
import zipfile

import medmnist
import numpy as np
from medmnist.dataset import MedMNIST2D as _Package2D
from torchvision import transforms as T

from datasets import DATASETS
from datasets._common import DiskDataset
from datasets.base import Splits
from datasets.cifar100 import CIFAR100

NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


class MedMNISTBase(DiskDataset):
    """Reading MedMNIST .npz files from `<root>/medmnist/`, and the MedMNIST transforms."""

    use_path = False
    folder = "medmnist"
    mean, std = CIFAR100.mean, CIFAR100.std
    img_size = 28  # replaced by the files' size on load
    flip = True

    def npz_file(self, root: str, names: tuple[str, ...]) -> str:
        """The smallest `<name>.npz` / `<name>_<size>.npz` in `<root>/medmnist/` for any of `names`."""
        folder = os.path.join(root, self.folder)
        pattern = re.compile(rf"^(?:{'|'.join(map(re.escape, names))})(?:_(\d+))?\.npz$")
        found = sorted((int(m.group(1) or 28), f) for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                       if (m := pattern.match(f)))
        if not found:
            raise self.fail(f"no {names[0]}.npz or {names[0]}_<size>.npz in '{folder}'")
        return os.path.join(folder, found[0][1])

    def read_npz(self, path: str, n_classes: int, multi_label: bool = False) -> list[np.ndarray]:
        """[train_x, train_y, test_x, test_y]: uint8 (N, H, W, 3) images and int64 labels in [0, n_classes)."""
        try:
            with np.load(path) as npz:
                arrays = {key: npz[key] for key in NPZ_KEYS}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            raise self.fail(f"'{path}' is not a readable .npz with the keys {', '.join(NPZ_KEYS)}") from None
        out = []
        for split in ("train", "test"):
            x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y) or x.shape[1] != x.shape[2]:
                raise self.fail(f"'{path}': {split}_images must be uint8 (N, H, H[, C]) with one label per image")
            x = x[..., None] if x.ndim == 3 else x
            x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
            y = y.reshape(len(y), -1)
            if multi_label:
                single = y.sum(1) == 1
                x, y = x[single], y[single].argmax(1)
            else:
                y = y[:, 0]
            self.check_labels(y, n_classes, f"{path} ({split}_labels)")
            out += [np.ascontiguousarray(x), y.astype(np.int64)]
        return out

    def train_augment(self):
        crop = T.RandomCrop(self.img_size, padding=self.img_size // 7)
        return [crop, T.RandomHorizontalFlip()] if self.flip else [crop]


class MedMNISTSubset(MedMNISTBase):
    """One MedMNIST subset; the registered subclasses set `flag`, the class names and the task split."""

    flag: str
    class_names: list[str]
    multi_label = False

    def load(self, root):
        train_x, train_y, test_x, test_y = self.read_npz(self.npz_file(root, (self.flag,)), self.n_classes,
                                                         self.multi_label)
        self.img_size = train_x.shape[1]
        return Splits(train_x, train_y, test_x, test_y, list(self.class_names))


def register_subset(flag: str, info: dict) -> None:
    names = [info["label"][str(i)] for i in range(len(info["label"]))]
    n = len(names)
    attrs = {"flag": flag, "class_names": names, "n_classes": n, "multi_label": info["task"].startswith("multi-label"),
             "flip": not any(side in name for name in names for side in ("left", "right")),
             "default_init_cls": 1 if n == 2 else 2 + n % 2, "default_increment": 1 if n == 2 else 2,
             "layout": f"medmnist/{flag}.npz or medmnist/{flag}_<size>.npz (keys {', '.join(NPZ_KEYS)})",
             "__doc__": f"{info['python_class']} ({n} classes), see the module docstring."}
    DATASETS.register(flag)(type(info["python_class"], (MedMNISTSubset,), attrs))


for _flag, _info in medmnist.INFO.items():
    if issubclass(getattr(medmnist, _info["python_class"]), _Package2D):
        register_subset(_flag, _info)
