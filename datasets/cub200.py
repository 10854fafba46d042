"""CUB-200-2011 (Wah et al., Caltech tech. report 2011): 200 bird species, 5994 train / 5794 test images.

Read from `<root>/CUB_200_2011/` as distributed: `images.txt` (`<id> <relative path>`), `image_class_labels.txt`
(`<id> <class 1-200>`), `train_test_split.txt` (`<id> <1 train | 0 test>`), the images below `images/`, and the
class names from `classes.txt` when present. Deviation from the original, whose loader was broken (an undefined
root attribute, labels kept as the strings "1".."200"): labels are 0-based ints. Transforms as in the original:
RandomResizedCrop(224, scale 0.6-1) + RandomRotation(20) + horizontal flip, ImageNet normalisation; the reference
names no test transform, so test images are only resized. Default 20 classes per task.
"""
import os

from torchvision import transforms as T

from datasets import DATASETS
from datasets._common import DiskDataset, integer, splits


@DATASETS.register("cub200")
class CUB200(DiskDataset):
    n_classes = 200
    img_size = 224
    default_init_cls = default_increment = 20
    folder = "CUB_200_2011"
    layout = "CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, images/<class>/<images>}"

    def load(self, root):
        base = os.path.join(root, self.folder)
        paths = self.id_table(os.path.join(base, "images.txt"))
        classes = self.id_table(os.path.join(base, "image_class_labels.txt"))
        is_train = self.id_table(os.path.join(base, "train_test_split.txt"))
        if not set(paths) == set(classes) == set(is_train):
            raise self.fail("images.txt, image_class_labels.txt and train_test_split.txt list different image ids")
        if any(integer(c) is None for c in classes.values()) or set(is_train.values()) - {"0", "1"}:
            raise self.fail("image_class_labels.txt needs integer classes, train_test_split.txt 0 or 1")
        labels = {i: integer(c) - 1 for i, c in classes.items()}
        self.check_labels(list(labels.values()), self.n_classes, "image_class_labels.txt (classes 1-200)")
        parts = {"1": ([], []), "0": ([], [])}
        for i in sorted(paths, key=int):
            part = parts[is_train[i]]
            part[0].append(os.path.join(base, "images", paths[i]))
            part[1].append(labels[i])
        self.check_exist(parts["1"][0] + parts["0"][0], os.path.join(base, "images.txt"), root)
        for split, key in (("train", "1"), ("test", "0")):
            self.check_classes(parts[key][1], self.n_classes, split)
        names_file = os.path.join(base, "classes.txt")
        names = self.id_table(names_file) if os.path.isfile(names_file) else {}
        names = [names[k] for k in sorted(names, key=int)] if len(names) == self.n_classes else None
        return splits(parts["1"], parts["0"], names)

    def id_table(self, path: str) -> dict[str, str]:
        """`<id> <value>` lines as {id: value} (ids: non-negative integers in ASCII digits)."""
        table = {}
        for number, line in self.text_lines(path):
            fields = line.split(maxsplit=1)
            if not fields:
                continue
            if len(fields) != 2 or not (fields[0].isascii() and fields[0].isdigit()):
                raise self.fail(f"{path} line {number} is not '<id> <value>'")
            table[fields[0]] = fields[1].strip()
        return table

    def train_augment(self):
        return [T.RandomResizedCrop(224, scale=(0.6, 1.0)), T.RandomRotation(20), T.RandomHorizontalFlip()]
