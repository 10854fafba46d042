"""Batched augmentation for in-memory datasets: whole batches on the training device, each image with its own
random parameters drawn from an explicit generator.

torchvision's transforms (v1 and v2) applied to a batch tensor draw one set of parameters for the whole batch
(one crop offset, one flip for all images), and draw it from the global RNG. These batched forms of the ones
our in-memory datasets use draw per image, from the generator the engine passes, so a run's augmentation
depends only on its seed, task, stage, epoch and batch, not on how many workers or devices there are.

`batched(transforms)` translates a dataset's torchvision train augmentations into these ops, or returns None
when one of them has no batched form (the dataset then keeps the per-sample PIL path). Images are float
(B, C, H, W) in [0, 1]; the semantics follow torchvision's: RandomCrop pads with zeros, then cuts a size x size
window at a uniform offset; RandomHorizontalFlip flips with probability p; ColorJitter(brightness=b) scales by
a factor uniform in [max(0, 1 - b), 1 + b] and clips to [0, 1].
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


class RandomCrop:
    def __init__(self, size: int, padding: int):
        self.size, self.padding = size, padding

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p)) if p else x
        top = torch.randint(0, h + 2 * p - self.size + 1, (b,), generator=generator, device=generator_device(generator))
        left = torch.randint(0, w + 2 * p - self.size + 1, (b,), generator=generator, device=generator_device(generator))
        steps = torch.arange(self.size, device=x.device)
        rows = (top.to(x.device)[:, None] + steps)[:, None, :, None]  # (B, 1, size, 1)
        cols = (left.to(x.device)[:, None] + steps)[:, None, None, :]  # (B, 1, 1, size)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[batch, channels, rows, cols]


class RandomHorizontalFlip:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        flip = torch.rand(len(x), generator=generator, device=generator_device(generator)).to(x.device) < self.p
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Brightness:
    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        u = torch.rand(len(x), generator=generator, device=generator_device(generator)).to(x.device)
        factor = self.low + (self.high - self.low) * u
        return (x * factor[:, None, None, None]).clamp(0.0, 1.0)


def generator_device(generator: torch.Generator | None):
    return generator.device if generator is not None else None


def batched(transforms: list) -> list | None:
    """The batched form of a list of torchvision transforms, or None if one has none."""
    from torchvision import transforms as T

    ops = []
    for t in transforms:
        if type(t) is T.RandomCrop and t.fill == 0 and t.padding_mode == "constant" and not t.pad_if_needed:
            pad = t.padding if isinstance(t.padding, int) else None
            if pad is None or t.size[0] != t.size[1]:
                return None
            ops.append(RandomCrop(t.size[0], pad))
        elif type(t) is T.RandomHorizontalFlip:
            ops.append(RandomHorizontalFlip(t.p))
        elif type(t) is T.ColorJitter and t.contrast is None and t.saturation is None and t.hue is None:
            if t.brightness is not None:
                ops.append(Brightness(*t.brightness))
        else:
            return None
    return ops
