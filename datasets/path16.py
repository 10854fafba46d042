"""Path16 (the original's pathology benchmark): 7 public pathology datasets as 7 tasks, 16 classes.

Sub-datasets in the original's default order ("order 5"): MHIST (2), breast_cancer (2), oral_cancer (2),
Patch_Camelyon (2), TCGA_STD (4), lung (2), colon (2); one task per sub-dataset, the sub-dataset order shuffled
by the seed with `shuffle: true`. About 800 train / 100 test images per class (original docstring); the curation
scripts are not public. Read from `<root>/Pathology16/<sub>/{train,test}/<class>/<images>`. Deviation from the
original: class ids inside a sub-dataset follow the *sorted* class folder names (the original used the unsorted
`os.listdir`, which differs between filesystems), and the test folders must hold the same classes as train.
Transforms as in the original: horizontal flip, CIFAR-100 normalisation, 224 px.
"""
import os

from torchvision import transforms as T

from datasets import DATASETS
from datasets._common import DiskDataset, splits
from datasets.cifar100 import CIFAR100

SUBSETS = {"MHIST": 2, "breast_cancer": 2, "oral_cancer": 2, "Patch_Camelyon": 2, "TCGA_STD": 4, "lung": 2,
           "colon": 2}


@DATASETS.register("path16")
class Path16(DiskDataset):
    task_groups = list(SUBSETS.values())
    n_classes = sum(task_groups)
    img_size = 224
    mean, std = CIFAR100.mean, CIFAR100.std
    folder = "Pathology16"
    layout = f"Pathology16/<sub>/{{train,test}}/<class>/<images> for <sub> in {', '.join(SUBSETS)}"

    def load(self, root):
        train, test, names = ([], []), ([], []), []
        for sub, n in SUBSETS.items():
            sub_train, sub_test, classes = self.folder_split(os.path.join(root, self.folder, sub), root, expected=n,
                                                             first_label=len(names))
            for part, new in ((train, sub_train), (test, sub_test)):
                part[0].extend(new[0])
                part[1].extend(new[1])
            names += [f"{sub}/{c}" for c in classes]
        return splits(train, test, names)

    def train_augment(self):
        return [T.RandomHorizontalFlip()]
