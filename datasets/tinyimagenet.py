"""Tiny ImageNet (Stanford CS231n, 2015): 200 ImageNet classes, 100k train / 10k val images of 64x64 px.

Read from `<root>/tiny-imagenet-200/` as distributed: `train/<wnid>/images/*.JPEG` and the validation set
`val/images/*.JPEG` labelled by `val/val_annotations.txt` (the validation set is the test split; the official
test set has no labels). Class ids are the sorted wnids. Transforms as in the original: horizontal flip and
brightness jitter 63/255, the original's ImageNet-R normalisation; default 20 classes per task (the original
shipped no config for it).
"""
import os

from torchvision import transforms as T

from datasets import DATASETS
from datasets._common import IMAGENET_R_NORM, DiskDataset, splits


@DATASETS.register("tinyimagenet")
class TinyImageNet(DiskDataset):
    n_classes = 200
    img_size = 64
    mean, std = IMAGENET_R_NORM
    default_init_cls = default_increment = 20
    folder = "tiny-imagenet-200"
    layout = "tiny-imagenet-200/{train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}"

    def load(self, root):
        base = os.path.join(root, self.folder)
        wnids = self.class_folders(os.path.join(base, "train"), self.n_classes)
        train = self.scan(os.path.join(base, "train"), wnids, root)
        label_of = {w: i for i, w in enumerate(wnids)}
        annotations = os.path.join(base, "val", "val_annotations.txt")
        test_paths, test_labels, lines = [], [], []
        for number, line in self.text_lines(annotations):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or fields[1] not in label_of:
                raise self.fail(f"{annotations} line {number}: expected '<file> <wnid> ...' with a train wnid")
            test_paths.append(os.path.join(base, "val", "images", fields[0]))
            test_labels.append(label_of[fields[1]])
            lines.append(number)
        self.check_exist(test_paths, annotations, root, lines)
        self.check_classes(test_labels, self.n_classes, "val")
        return splits(train, (test_paths, test_labels), wnids)

    def train_augment(self):
        return [T.RandomHorizontalFlip(), T.ColorJitter(brightness=63 / 255)]
