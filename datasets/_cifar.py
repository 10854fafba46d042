"""Readers for the CIFAR 'python version' pickles, the on-disk format torchvision's download leaves.

The batch files are pickles, and a pickle can run code: they are read with `utils.safe_pickle`, which admits
only what the real files hold (numpy arrays, lists, dicts, bytes, strings, numbers) and refuses anything else.
Every unreadable file is named in the one error, not only the first.
"""
import os

import numpy as np

from datasets.base import Splits
from utils import safe_pickle
from utils.registry import UserError


def _batch(path: str, label_key: str):
    """The (images, labels) of one batch file, or the reason it cannot be used."""
    try:
        batch = safe_pickle.load(path)
    except UserError as err:
        return str(err)
    key = label_key.encode()
    if not isinstance(batch, dict) or not isinstance(batch.get(b"data"), np.ndarray) or key not in batch:
        return f"'{path}' is not a CIFAR batch (a dict with b'data' and b'{label_key}')"
    data, labels = batch[b"data"], batch[key]
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        return f"'{path}': b'{label_key}' is not a list of integer labels"
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        return (f"'{path}': b'data' is a {data.dtype} array of shape {data.shape}, not uint8 (N, 3072) with one "
                "label per row")
    return data, labels


def read_cifar(root: str, folder: str, train_files: list[str], test_file: str, label_key: str,
               meta_file: str, names_key: str) -> Splits:
    base = os.path.join(root, folder)
    needed = [*train_files, test_file]
    missing = [f for f in needed if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise UserError(f"{folder} not found: expected {base}/{{{','.join(needed)}}} (the CIFAR 'python version', "
                        f"as torchvision's download leaves it); set data_root or $DATA; nothing is downloaded")
    batches = {name: _batch(os.path.join(base, name), label_key) for name in needed}
    names = None
    meta_path = os.path.join(base, meta_file)
    problems = [b for b in batches.values() if isinstance(b, str)]
    if os.path.isfile(meta_path):
        try:
            meta = safe_pickle.load(meta_path)
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key.encode()]]
        except UserError as err:
            problems.append(str(err))
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError):
            problems.append(f"'{meta_path}' holds no list b'{names_key}' of class names")
    labels = [b[1] for b in batches.values() if not isinstance(b, str)]
    top = max((int(y.max()) for y in labels if len(y)), default=-1)
    if names is not None and len(names) <= top:
        problems.append(f"'{meta_path}' names {len(names)} classes but the labels go up to {top}")
    if problems:
        raise UserError(f"{len(problems)} CIFAR file(s) cannot be used: " + "; ".join(problems))

    def images_labels(files):
        x = np.concatenate([batches[f][0] for f in files]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.concatenate([batches[f][1] for f in files])
        return np.ascontiguousarray(x, dtype=np.uint8), y

    train_x, train_y = images_labels(train_files)
    test_x, test_y = images_labels([test_file])
    return Splits(train_x, train_y, test_x, test_y, names)
