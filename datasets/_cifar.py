"""Readers for the CIFAR 'python version' pickles, the on-disk format torchvision's download leaves."""
import os
import pickle

import numpy as np

from datasets.base import Splits
from utils.registry import UserError


def read_cifar(root: str, folder: str, train_files: list[str], test_file: str, label_key: str,
               meta_file: str, names_key: str) -> Splits:
    base = os.path.join(root, folder)
    needed = [*train_files, test_file]
    missing = [f for f in needed if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise UserError(f"{folder} not found: expected {base}/{{{','.join(needed)}}} (the CIFAR 'python version', "
                        f"as torchvision's download leaves it); set data_root or $DATA; nothing is downloaded")

    def read(name):
        try:
            with open(os.path.join(base, name), "rb") as f:
                return pickle.load(f, encoding="bytes")
        except Exception:
            raise UserError(f"{os.path.join(base, name)} is not a readable CIFAR batch file") from None

    def images_labels(files):
        batches = [read(f) for f in files]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.concatenate([b[label_key.encode()] for b in batches]).astype(np.int64)
        return np.ascontiguousarray(x, dtype=np.uint8), y

    train_x, train_y = images_labels(train_files)
    test_x, test_y = images_labels([test_file])
    names = None
    if os.path.isfile(os.path.join(base, meta_file)):
        names = [n.decode() for n in read(meta_file)[names_key.encode()]]
    return Splits(train_x, train_y, test_x, test_y, names)
