"""ImageNet-100 (the 100-class ImageNet subset of the original code, `miniImageNet`): list files.

Read from `<root>/miniImageNet/{train.txt, val.txt}`, one `<relative path> <label>` line per image (labels
0-99), paths relative to `<root>/miniImageNet/`. Deviation from the original: it joined root and path by string
concatenation (so paths had to start with '/'); we join them with os.path.join, dropping a leading '/'.
Transforms as in the original (MoCo-v2 style): RandomResizedCrop(224, scale 0.2-1), colour jitter
(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur (sigma 0.1-2) with p 0.5, horizontal flip; test
Resize(256) + CenterCrop(224); ImageNet normalisation. The blur is PIL's Gaussian blur with a random sigma, as in
MoCo v2 (torchvision's GaussianBlur needs a kernel size the reference does not give, and its convolution is
about 100 times slower on a CPU worker). Class names are the parent folders of the listed images.
"""
import os
import random

from PIL import ImageFilter
from torchvision import transforms as T

from datasets import DATASETS
from datasets._common import DiskDataset, folder_names, splits


@DATASETS.register("imagenet100")
class ImageNet100(DiskDataset):
    n_classes = 100
    img_size = 224
    default_init_cls = default_increment = 10
    folder = "miniImageNet"
    layout = "miniImageNet/{train.txt, val.txt} with '<relative path> <label>' lines, paths below miniImageNet/"

    def load(self, root):
        base = os.path.join(root, self.folder)
        train = self.read_list(os.path.join(base, "train.txt"), base, self.n_classes, root)
        test = self.read_list(os.path.join(base, "val.txt"), base, self.n_classes, root)
        self.check_classes(train[1], self.n_classes, "train")
        return splits(train, test, folder_names(*train, self.n_classes))

    def train_augment(self):
        return [T.RandomResizedCrop(224, scale=(0.2, 1.0)),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                T.RandomApply([RandomBlur(0.1, 2.0)], p=0.5), T.RandomHorizontalFlip()]

    def test_augment(self):
        return [T.Resize((256, 256)), T.CenterCrop(224)]


class RandomBlur:
    """PIL Gaussian blur with a standard deviation drawn uniformly from [low, high]."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.low, self.high)))
