"""Skin40: the original's 40-class subset of SD-198 (Sun et al., ECCV 2016), 50 train / 10 test images per class.

Read from `<root>/SD-198/`: the split files `main_classes_split/train_1.txt` and `val_1.txt` (`<relative path>
<label>` lines, labels 0-39; the val file is the test split) and the images below `images/`, to which the
listed paths are relative. Class names are the parent folders of the listed images. Transforms as in the
original: horizontal flip, the skin normalisation, 224 px; default 10 classes per task (its configs used 5 or 10).
"""
import os

from datasets import DATASETS
from datasets._common import SkinDataset, folder_names, splits


@DATASETS.register("skin40")
class Skin40(SkinDataset):
    n_classes = 40
    default_init_cls = default_increment = 10
    folder = "SD-198"
    layout = "SD-198/{main_classes_split/{train_1.txt, val_1.txt}, images/<class>/<images>}"

    def load(self, root):
        base = os.path.join(root, self.folder)
        images = self.need(os.path.join(base, "images"), "folder")
        train, test = (self.read_list(os.path.join(base, "main_classes_split", f), images, self.n_classes, root)
                       for f in ("train_1.txt", "val_1.txt"))
        self.check_classes(train[1], self.n_classes, "train")
        return splits(train, test, folder_names(*train, self.n_classes))
