"""An epoch's batches: the order and augmentation seeded by (run seed, task, stage, epoch), never by the global
RNG, so they do not depend on the number of workers, on the device, or on whether the run was resumed; and the
split of each global batch between the processes of a distributed run (rank r takes rows r, r + N, ...).

Views of in-memory pools (datasets/base.py) are read a batch at a time and augmented on the device; file
datasets are decoded in DataLoader workers that persist from epoch to epoch, each sample's augmentation seeded
from the epoch's key and its index.
"""
from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader


def epoch_key(seed: int, task: int, stage: str, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation: a function of run seed, task, stage and epoch only."""
    return int(np.random.SeedSequence([seed, task, zlib.crc32(stage.encode()), epoch]).generate_state(1)[0])


def epoch_order(n: int, key: int | None) -> torch.Tensor:
    """The epoch's order of n samples: a permutation drawn from `key`, or 0..n-1 when key is None."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(key)) if key is not None else torch.arange(n)


def shard(order: torch.Tensor, batch_size: int, drop_last: bool, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's rows of each global batch of `order`: rows[rank::world] of every `batch_size` consecutive
    ones (the whole batch on a single process), so the ranks together see each global batch once."""
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[start: start + batch_size][rank::world] for start in range(0, stop, batch_size)]


class SeededSampler(torch.utils.data.Sampler):
    """A DataLoader batch sampler: this rank's indices of each global batch of one epoch (`shard` of the epoch's
    order); for a dataset that `takes_seeds`, each paired with the seed of its sample's augmentation, a function
    of the epoch's key and the index. The ranks' batches together are the global batches."""

    def __init__(self, n: int, shuffle: bool, seeds: bool, batch_size: int, drop_last: bool, rank: int, world: int):
        self.n, self.shuffle, self.seeds, self.key = n, shuffle, seeds, 0
        self.batch_size, self.drop_last, self.rank, self.world = batch_size, drop_last, rank, world

    def set_epoch(self, key: int) -> None:
        self.key = key

    def __len__(self) -> int:
        return sum(len(rows) > 0 for rows in shard(torch.arange(self.n), self.batch_size, self.drop_last, self.rank,
                                                   self.world))

    def __iter__(self):
        order = epoch_order(self.n, self.key if self.shuffle else None)
        seeds = np.random.SeedSequence(self.key).generate_state(self.n) if self.seeds else None
        for rows in shard(order, self.batch_size, self.drop_last, self.rank, self.world):
            if len(rows):  # (an inference pass's last batch may leave a rank without a sample)
                yield [(i, int(seeds[i])) for i in rows.tolist()] if seeds is not None else rows.tolist()


class Batches:
    """Device batches of one dataset, an epoch at a time: shuffled by the epoch's key or in order. Every sample is
    seen once per epoch; training drops only a last batch of a single sample (batch norm cannot normalise one
    sample of 1-d features). A view of an in-memory pool (`dataset.batched`) is gathered, augmented
    and normalised a whole batch at a time on the device; anything else goes through one DataLoader, whose
    workers persist from epoch to epoch. `to_device` moves (and lays out) each tensor of a batch."""

    def __init__(self, dataset, batch_size: int, shuffle: bool, device: torch.device, to_device, rank: int = 0,
                 world: int = 1, num_workers: int = 0):
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.device, self.to_device, self.rank, self.world = device, to_device, rank, world
        n = len(dataset)
        # a last batch too small for every rank to get a sample (or a lone one, which batch norm cannot normalise)
        self.drop_last = shuffle and 0 < n % batch_size < max(2, world) and n > batch_size
        self.loader = None
        if not getattr(dataset, "batched", False):
            self.sampler = SeededSampler(n, shuffle, shuffle and getattr(dataset, "takes_seeds", False), batch_size,
                                         self.drop_last, rank, world)
            self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                     pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                                     prefetch_factor=4 if num_workers else None, generator=torch.Generator())

    def sizes(self) -> list[int]:
        """The number of samples of each global batch of an epoch (every rank's shares together)."""
        n = len(self.dataset)
        stop = n - n % self.batch_size if self.drop_last else n
        return [min(self.batch_size, stop - start) for start in range(0, stop, self.batch_size)]

    def epoch(self, key: int | None) -> Iterator[tuple]:
        """This rank's share of each batch of the epoch `key` (None: in order)."""
        if self.loader is not None:
            self.sampler.set_epoch(key or 0)
            for batch in self.loader:
                yield tuple(self.to_device(t) for t in batch)
            return
        key = key if self.shuffle else None
        generator = torch.Generator().manual_seed(key) if key is not None else None
        for rows in shard(epoch_order(len(self.dataset), key), self.batch_size, self.drop_last, self.rank,
                          self.world):
            yield tuple(self.to_device(t) for t in self.dataset.batch(rows, self.device, generator))
