"""CIFAR-10 (Krizhevsky 2009): 10 classes, 50k/10k 32x32 images, read from `<root>/cifar-10-batches-py/`.

Transforms as in the original: RandomCrop(32, padding 4) + horizontal flip for training; default 2 classes per task.
"""
from torchvision import transforms as T

from datasets import DATASETS
from datasets._cifar import read_cifar
from datasets.base import CLDataset


@DATASETS.register("cifar10")
class CIFAR10(CLDataset):
    n_classes = 10
    img_size = 32
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615)
    default_init_cls = default_increment = 2

    def load(self, root):
        return read_cifar(root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                          "labels", "batches.meta", "label_names")

    def train_augment(self):
        return [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
