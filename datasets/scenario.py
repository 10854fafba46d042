"""The scenario (DataManager): class order, the split of classes into tasks, and datasets for any set of classes.

Labels are remapped once so that task t holds the contiguous labels [known, total) in the class order.
Class order: the dataset's own order, or with `shuffle` a permutation drawn from `class_order_seed` (default: the
run's seed, as in the original). Datasets made of sub-datasets (`task_groups`) keep one task per group; with
`shuffle` the group order is permuted instead and classes inside a group keep their order.

Validation (`val_split` > 0): a stratified share of every class's training samples is held out
(`validation_positions`), drawn from the run's seed on the dataset's own labels, so it depends on neither the class
order nor the method. The held-out samples stay in the train pool (every position keeps its meaning), but
`indices("train", ...)` leaves them out, so training, memory and class means never see them; `indices("val", ...)`
and `dataset("val", ...)` give them (un-augmented) to the evaluation.
"""
from __future__ import annotations

import os

import numpy as np

from datasets import DATASETS
from datasets.base import NORMALIZATIONS, Pool, PoolView
from utils.registry import UserError
from utils.types import Task


def data_root(cfg) -> str:
    return cfg.data_root or os.environ.get("DATA") or "data"


def task_sizes(cfg, spec) -> tuple[int, int]:
    """(init_cls, increment): the config's, else the dataset's defaults, each defaulting to the other."""
    init_cls = cfg.init_cls or spec.default_init_cls or cfg.increment
    increment = cfg.increment or spec.default_increment or init_cls
    if init_cls is None:
        raise UserError(f"dataset '{cfg.dataset}' needs init_cls and increment")
    return init_cls, increment


def split_classes(n_classes: int, init_cls: int, increment: int) -> list[int]:
    """Task sizes: init_cls, then increment per task; the last task takes the remainder."""
    if init_cls > n_classes:
        raise UserError(f"init_cls ({init_cls}) is larger than the dataset's {n_classes} classes")
    steps = [init_cls]
    while sum(steps) + increment < n_classes:
        steps.append(increment)
    if n_classes - sum(steps) > 0:
        steps.append(n_classes - sum(steps))
    return steps


def validation_positions(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Sorted train-pool positions held out for validation: `round(share * n)` of each class of n samples (at
    least 1 when share > 0 and n >= 2, at most n - 1 so that every class keeps a training sample), chosen by one
    random key per sample from `seed`'s generator (a stream of its own: the class order's draws are unchanged)."""
    labels = np.asarray(labels)
    if share <= 0 or not len(labels):
        return np.zeros(0, dtype=np.int64)
    _, label_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
    take = np.minimum(np.maximum(np.rint(share * counts), 1), counts - 1)
    order = np.lexsort((np.random.default_rng(seed).random(len(labels)), label_of))  # by class, then random key
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(labels)) - starts[label_of[order]]  # rank of each sample inside its class's shuffle
    return np.sort(order[rank < take[label_of[order]]])


class DataManager:
    def __init__(self, cfg, seed: int, single_task: bool = False):
        self.seed = seed
        spec_cls = DATASETS.get(cfg.dataset)
        accepted = getattr(spec_cls, "dataset_keys", ())
        for name in ("train_list", "test_list"):
            if getattr(cfg, name) is not None and name not in accepted:
                raise UserError(f"dataset '{cfg.dataset}' does not take {name}; remove it")
        self.spec = spec_cls(**{k: getattr(cfg, k) for k in accepted if getattr(cfg, k) is not None})
        if cfg.normalize in NORMALIZATIONS:  # every path reads the spec's: per-sample, batched, a method's own
            self.spec.mean, self.spec.std = NORMALIZATIONS[cfg.normalize]
        data = self.spec.load(data_root(cfg))
        self.img_size = cfg.img_size or self.spec.img_size
        n = self.spec.n_classes
        for name, y in (("train", data.train_y), ("test", data.test_y)):
            if len(y) and (y.min() < 0 or y.max() >= n):
                raise UserError(f"dataset '{cfg.dataset}': a {name} label lies outside [0, {n})")
        rng = np.random.RandomState(seed if cfg.class_order_seed is None else cfg.class_order_seed)

        groups = self.spec.task_groups
        if groups:  # one task per sub-dataset
            starts = np.cumsum([0] + groups[:-1])
            group_order = rng.permutation(len(groups)) if cfg.shuffle else np.arange(len(groups))
            order = np.concatenate([np.arange(starts[g], starts[g] + groups[g]) for g in group_order])
            steps = [groups[g] for g in group_order]
        else:
            order = rng.permutation(n) if cfg.shuffle else np.arange(n)
            steps = split_classes(n, *task_sizes(cfg, self.spec))
        if single_task or not cfg.split_dataset:
            steps = [n]
        self.class_order = [int(c) for c in order]
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        self.train_x, self.train_y = data.train_x, rank[data.train_y]
        self.val_index = validation_positions(data.train_y, cfg.val_split, seed)
        self._held_out = np.zeros(len(self.train_y), dtype=bool)
        self._held_out[self.val_index] = True
        self.test_x, self.test_y = data.test_x, rank[data.test_y]
        names = data.class_names
        self.class_names = [names[c] for c in order] if names else [str(c) for c in order]
        bounds = np.cumsum([0] + steps)
        self.tasks = [Task(i, int(bounds[i]), int(bounds[i + 1]), len(steps)) for i in range(len(steps))]
        self.n_classes = n
        self.batch_transforms = cfg.batch_transforms
        self._pools: dict[str, Pool] = {}

    def class_of_task(self) -> np.ndarray:
        """task index of every (remapped) class."""
        return np.repeat(np.arange(len(self.tasks)), [t.total - t.known for t in self.tasks])

    def indices(self, split: str, classes) -> np.ndarray:
        """Positions of the samples of `classes` in the test pool ("test") or the train pool: its training part
        ("train": without the validation samples) or its validation part ("val")."""
        classes = np.asarray(list(classes))
        if split == "test":
            return np.flatnonzero(np.isin(self.test_y, classes))
        if split not in ("train", "val"):
            raise ValueError(f"no split '{split}' (train, val, test)")
        part = self._held_out if split == "val" else ~self._held_out
        return np.flatnonzero(np.isin(self.train_y, classes) & part)

    def pool(self, split: str) -> Pool:
        """The train pool ("train" and "val": the validation samples are train-pool positions) or the test pool."""
        split = "train" if split == "val" else split
        if split not in self._pools:
            x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
            self._pools[split] = Pool(self.spec, x, y, self.img_size, self.batch_transforms)
        return self._pools[split]

    def dataset(self, split: str, indices: np.ndarray, augment: bool | None = None) -> PoolView:
        """Samples of the train or test pool ("val": the train pool's validation positions); `augment` defaults to
        True for train, False for val and test."""
        return PoolView(self.pool(split), indices, (split == "train") if augment is None else augment)
