"""Validate a dataset folder before training: python -m datasets.check NAME [--data_root DIR]

Loads the dataset as a run would (so a missing or malformed folder, or a listed or symlinked file outside the data
root, gives the same one-line message), then reports the class counts per split and every image file a run would
refuse, read by the run's own reader (datasets.base.decode_image): missing, undecodable, above PIL's
decompression-bomb limit, or of pixels with no known 8-bit scale (float, 32-bit integer beyond 16 bits); the pickled
CIFAR batches are read without running code from them. Images of 16-bit pixels, which a run rescales to 8 bits,
are listed as a note. Exit status 0 when nothing is wrong, 1 otherwise. This module registers nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from datasets import DATASETS
from datasets.base import SIXTEEN_BIT_MODES, ImageProblem, bomb_warnings_raise, decode_image
from utils.registry import UserError


@dataclass
class Report:
    name: str
    root: str
    class_names: list[str] = field(default_factory=list)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # split -> images per class
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a run accepts but the user should know

    @property
    def ok(self) -> bool:
        return not self.problems


def examine(path: str) -> tuple[str | None, str | None]:
    """(why a run would refuse the image at `path`, or None; its stored mode when a run rescales it, or None)."""
    if not os.path.isfile(path):
        return f"{path}: missing", None
    try:
        _, mode = decode_image(path)
    except ImageProblem as problem:
        return str(problem), None
    return None, mode if mode in SIXTEEN_BIT_MODES else None


def check(name: str, root: str, decode: bool = True, workers: int = 4, **dataset_keys) -> Report:
    """Load dataset `name` from `root`, count images per class and split, and (for image files) decode them.
    `dataset_keys` (train_list, test_list) go to datasets that take them."""
    spec_cls = DATASETS.get(name)
    dataset_keys = {k: v for k, v in dataset_keys.items() if v is not None}
    unknown = sorted(set(dataset_keys) - set(getattr(spec_cls, "dataset_keys", ())))
    if unknown:
        raise UserError(f"dataset '{name}' takes no {', '.join(unknown)}")
    spec = spec_cls(**dataset_keys)
    report = Report(name, root)
    try:
        data = spec.load(root)
    except UserError as err:
        report.problems.append(str(err))
        return report
    n = spec.n_classes
    report.class_names = list(data.class_names or range(n))
    for split, y in (("train", data.train_y), ("test", data.test_y)):
        report.counts[split] = np.bincount(np.asarray(y, dtype=np.int64), minlength=n)
        empty = np.flatnonzero(report.counts[split] == 0)
        if len(empty):
            report.problems.append(f"{len(empty)} classes have no {split} images, e.g. "
                                   f"'{report.class_names[empty[0]]}' (label {empty[0]})")
    if spec.use_path and decode:
        files = [str(p) for p in np.concatenate([data.train_x, data.test_x])]
        with bomb_warnings_raise(), ThreadPoolExecutor(max(1, workers)) as pool:  # the filter, once for all threads
            found = list(pool.map(examine, files, chunksize=64))
        bad = [why for why, _ in found if why]
        if bad:  # every one of them, so that a single pass finds them all
            report.problems.append(f"{len(bad)} of {len(files)} image files cannot be used:"
                                   + "".join(f"\n  {why}" for why in bad))
        wide = [(path, mode) for path, (_, mode) in zip(files, found) if mode]
        if wide:
            report.notes.append(f"{len(wide)} image files hold pixels of more than 8 bits, which a run rescales to "
                                "8 bits (value / 257):" + "".join(f"\n  {path} (mode {mode})" for path, mode in wide))
    return report


def describe(report: Report) -> str:
    """The report in plain words: a per-class table, then the problems."""
    lines = [f"dataset '{report.name}' under '{report.root}'"]
    if report.counts:
        train, test = report.counts["train"], report.counts["test"]
        lines.append(f"{len(report.class_names)} classes, {train.sum()} train and {test.sum()} test images")
        width = max(len(str(c)) for c in report.class_names)
        lines.append(f"  {'label':>5}  {'class':<{width}}  {'train':>7}  {'test':>7}")
        lines += [f"  {i:>5}  {str(c):<{width}}  {train[i]:>7}  {test[i]:>7}" for i, c in enumerate(report.class_names)]
    lines += [f"problem: {p}" for p in report.problems] or ["no problems found"]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets.check", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="registered dataset name (python main.py --list datasets)")
    parser.add_argument("--data_root", help="folder holding the datasets (default: $DATA, else ./data)")
    parser.add_argument("--train_list", help="skin8: list file of '<relative path> <label>' training lines")
    parser.add_argument("--test_list", help="skin8: the same for the test split")
    parser.add_argument("--no_decode", action="store_true", help="only check that image files exist")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads decoding images")
    args = parser.parse_args(argv)
    root = args.data_root or os.environ.get("DATA") or "data"
    try:
        report = check(args.name, root, decode=not args.no_decode, workers=args.workers,
                       train_list=args.train_list, test_list=args.test_list)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
