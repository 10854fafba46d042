"""ImageNet-1k (ILSVRC 2012, Russakovsky et al. IJCV 2015): 1000 classes, about 1.28M train / 50k val images.

Read from `<root>/ilsvrc2012/{train,val}/<wnid>/*` (the ImageFolder layout; the validation set, sorted into
wnid folders, is the test split). Class ids are the sorted wnids, the same for both splits. Transforms as in the
original: RandomResizedCrop(224) + horizontal flip + brightness jitter 63/255; test Resize(256) +
CenterCrop(224); ImageNet normalisation; default 100 classes per task (the original's config).
"""
import os

from torchvision import transforms as T

from datasets import DATASETS
from datasets._common import DiskDataset, splits


@DATASETS.register("imagenet1000")
class ImageNet1000(DiskDataset):
    n_classes = 1000
    img_size = 224
    default_init_cls = default_increment = 100
    folder = "ilsvrc2012"
    layout = "ilsvrc2012/{train,val}/<wnid>/<images>"

    def load(self, root):
        return splits(*self.folder_split(os.path.join(root, self.folder), root, "train", "val", self.n_classes))

    def train_augment(self):
        return [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ColorJitter(brightness=63 / 255)]

    def test_augment(self):
        return [T.Resize((256, 256)), T.CenterCrop(224)]
