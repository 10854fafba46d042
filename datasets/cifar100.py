"""CIFAR-100 (Krizhevsky 2009): 100 classes, 50k/10k 32x32 images, read from `<root>/cifar-100-python/`.

Transforms as in the original: RandomCrop(32, padding 4) + horizontal flip + brightness jitter 63/255.
Default 10 classes per task.
"""
from torchvision import transforms as T

from datasets import DATASETS
from datasets._cifar import read_cifar
from datasets.base import CLDataset


@DATASETS.register("cifar100")
class CIFAR100(CLDataset):
    n_classes = 100
    img_size = 32
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    default_init_cls = default_increment = 10

    def load(self, root):
        return read_cifar(root, "cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names")

    def train_augment(self):
        return [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(brightness=63 / 255)]
