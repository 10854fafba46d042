"""What a dataset provides: raw train/test items and labels, its class count and its transforms."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from utils.registry import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Splits:
    """Raw data: uint8 HWC image arrays (in-memory datasets) or file paths, and integer labels in [0, n_classes)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str] | None = None


class CLDataset:
    """Base of every registered dataset; subclasses set the attributes and implement `load`.

    Train augmentations run at the native resolution, then every split is resized to `img_size`, converted to
    a tensor and normalised (the original's order).
    """

    n_classes: int
    img_size: int  # default final size
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    use_path: bool = False
    default_init_cls: int | None = None
    default_increment: int | None = None
    task_groups: list[int] | None = None  # fixed tasks: class counts of consecutive label ranges

    def load(self, root: str) -> Splits:
        raise NotImplementedError

    def train_augment(self) -> list:
        return []

    def test_augment(self) -> list:
        return []

    def transform(self, train: bool, img_size: int) -> T.Compose:
        extra = self.train_augment() if train else self.test_augment()
        return T.Compose([*extra, T.Resize((img_size, img_size), antialias=True), T.ToTensor(),
                          T.Normalize(self.mean, self.std)])


class ImageDataset(torch.utils.data.Dataset):
    """Items (uint8 HWC arrays or paths) with labels and a transform; images are decoded in the workers."""

    def __init__(self, items: np.ndarray, targets: np.ndarray, transform, use_path: bool):
        self.items, self.targets = items, np.asarray(targets, dtype=np.int64)
        self.transform, self.use_path = transform, use_path

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        if self.use_path:
            try:
                with Image.open(self.items[i]) as img:
                    image = img.convert("RGB")
            except (OSError, ValueError) as err:
                raise UserError(f"cannot read image '{self.items[i]}' ({type(err).__name__}); replace or remove it "
                                "(python -m datasets.check <dataset> lists every unreadable file)") from None
        else:
            image = Image.fromarray(self.items[i])
        return self.transform(image), int(self.targets[i])
