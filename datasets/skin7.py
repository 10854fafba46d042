"""Skin7: ISIC 2018 Task 3 (Codella et al. 2019; Tschandl et al., HAM10000, Sci. Data 2018), 7 lesion classes.

Read from `<root>/ISIC_2018_Classification/`: the split files `split_data/split_data_1_fold_train.csv` and
`split_data_1_fold_test.csv` (rows `<image>,<label>`, an optional header row) and the images in
`ISIC2018_Task3_Training_Input/`, the official flat image folder. An image entry may be a relative path or a
bare ISIC id; it is looked up by its file name in the image folder (".jpg" is added to a bare id). Labels 0-6
are MEL, NV, BCC, AKIEC, BKL, DF, VASC, the column order of the official ground truth. Transforms as in the
original: horizontal flip, the skin normalisation, 224 px. Default tasks: 3 + 2 + 2 classes (the original
shipped no config for it).
"""
import os

from datasets import DATASETS
from datasets._common import IMAGE_EXTENSIONS, SkinDataset, integer, splits


@DATASETS.register("skin7")
class Skin7(SkinDataset):
    n_classes = 7
    class_names = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    default_init_cls, default_increment = 3, 2
    folder = "ISIC_2018_Classification"
    layout = ("ISIC_2018_Classification/{split_data/split_data_1_fold_{train,test}.csv, "
              "ISIC2018_Task3_Training_Input/ISIC_*.jpg}")

    def load(self, root):
        base = os.path.join(root, self.folder)
        images = self.need(os.path.join(base, "ISIC2018_Task3_Training_Input"), "folder")
        parts = [self.read_split(os.path.join(base, "split_data", f"split_data_1_fold_{split}.csv"), images, root)
                 for split in ("train", "test")]
        self.check_classes(parts[0][1], self.n_classes, "train")
        return splits(*parts, self.class_names)

    def read_split(self, path: str, images: str, root: str) -> tuple[list[str], list[int]]:
        rows = self.read_csv(path)
        if rows and integer(rows[0][-1]) is None:
            rows = rows[1:]  # header
        if any(len(row) < 2 or integer(row[-1]) is None for row in rows):
            raise self.fail(f"{path}: every row must be '<image>,<label>'")
        paths = []
        for row in rows:
            name = os.path.basename(row[0].strip())
            paths.append(os.path.join(images, name if name.lower().endswith(IMAGE_EXTENSIONS) else name + ".jpg"))
        labels = [integer(row[-1]) for row in rows]
        self.check_labels(labels, self.n_classes, path)
        self.check_exist(paths, path, root)
        return paths, labels
