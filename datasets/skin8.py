"""Skin8: the original's class-balanced subset of the ISIC 2019 training set (Tschandl 2018, Codella 2018,
Combalia 2019), 8 lesion classes, 3555 train / 705 test images.

Labels: 0 BKL, 1 MEL, 2 DF, 3 NV, 4 SCC, 5 BCC, 6 AK, 7 VASC. Images below `<root>/ISIC2019/`. Two sources:
- list files in the original's format (`Data/<CLS>/ISIC_xxx.jpg <label>` lines, paths relative to
  `<root>/ISIC2019/`), given by the dataset keys `train_list` / `test_list`; when they are unset, the original's
  file names `ISIC2019/skin8_train_500.txt` and `skin8_test_500.txt` are used if both exist;
- otherwise a split built from the official `ISIC2019/ISIC_2019_Training_GroundTruth.csv` (one-hot rows
  `image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`) and `ISIC2019/ISIC_2019_Training_Input/<image>.jpg`, with the
  original's per-class counts: train 524 / test 104, except DF 200/39 and VASC 211/42 (every DF and VASC image).
  The images of a class are ordered by the SHA-1 of their id (no seed: the same split on every machine); the
  first `train + test` are kept, the first `test` of those are the test split. With fewer images than that
  (a partial copy), all are kept and split in the same ratio, with at least one test image.
The original's own image subset cannot be reproduced from the ground truth (its list files are not public
outside its repository), so the CSV split draws other images of the same classes in the same numbers.
Transforms as in the original: horizontal flip, the skin normalisation, 224 px. Metric in the original: mcr.
"""
import os

from datasets import DATASETS
from datasets._common import SkinDataset, held_out, splits, stable_order

#: class -> (train, test) images in the original's split
COUNTS = {"BKL": (524, 104), "MEL": (524, 104), "DF": (200, 39), "NV": (524, 104), "SCC": (524, 104),
          "BCC": (524, 104), "AK": (524, 104), "VASC": (211, 42)}


@DATASETS.register("skin8")
class Skin8(SkinDataset):
    n_classes = 8
    class_names = list(COUNTS)
    default_init_cls = default_increment = 2
    folder = "ISIC2019"
    layout = ("ISIC2019/{Data/<CLS>/ISIC_*.jpg with list files (train_list, test_list)} or "
              "ISIC2019/{ISIC_2019_Training_GroundTruth.csv, ISIC_2019_Training_Input/ISIC_*.jpg}")
    default_lists = ("skin8_train_500.txt", "skin8_test_500.txt")
    #: constructor arguments that come from the config (once utils/config.py declares them)
    dataset_keys = ("train_list", "test_list")

    def __init__(self, train_list: str | None = None, test_list: str | None = None):
        self.train_list, self.test_list = train_list, test_list

    def load(self, root):
        base = os.path.join(root, self.folder)
        lists = (self.train_list, self.test_list)
        if lists == (None, None) and all(os.path.isfile(os.path.join(base, f)) for f in self.default_lists):
            lists = tuple(os.path.join(base, f) for f in self.default_lists)
        if None in lists and lists != (None, None):
            raise self.fail("give both train_list and test_list, or neither")
        if lists != (None, None):
            train, test = (self.read_list(path, base, self.n_classes, root) for path in lists)
        else:
            train, test = self.ground_truth_split(base, root)
        self.check_classes(train[1], self.n_classes, "train")
        return splits(train, test, self.class_names)

    def ground_truth_split(self, base: str, root: str):
        path = os.path.join(base, "ISIC_2019_Training_GroundTruth.csv")
        rows = self.read_csv(path)
        header = rows[0] if rows else []
        if header[:1] != ["image"] or not set(COUNTS) <= set(header):
            raise self.fail(f"{path} must start with the header image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK")
        columns = [header.index(c) for c in COUNTS]
        ids = [[] for _ in COUNTS]
        for number, row in enumerate(rows[1:], 2):
            try:
                hot = [float(row[c]) for c in columns]
            except (IndexError, ValueError):
                raise self.fail(f"{path} line {number} is not a one-hot row") from None
            if max(hot) == 1.0:
                ids[hot.index(1.0)].append(row[0])
        train, test = ([], []), ([], [])
        for label, ((n_train, n_test), class_ids) in enumerate(zip(COUNTS.values(), ids)):
            chosen = stable_order(class_ids)[: n_train + n_test]
            n_held = held_out(len(chosen), n_test, n_train + n_test)
            for i, image in enumerate(chosen):
                part = test if i < n_held else train
                part[0].append(os.path.join(base, "ISIC_2019_Training_Input", image + ".jpg"))
                part[1].append(label)
        self.check_exist(train[0] + test[0], path, root)
        return train, test
