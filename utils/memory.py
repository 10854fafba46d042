"""Replay memories: the exemplar memory (which training samples of each seen class are kept for replay, and
class means for NME) and DER's reservoir buffer of logits.

Exemplars are stored as positions in the DataManager's train pool (the pool never changes during a run), in
priority order, so shrinking a class keeps its best exemplars and the state is a few integer arrays.

Budget: `fixed_memory` keeps `memory_per_class` (default memory_size // number of classes) per class;
otherwise the total `memory_size` is split evenly over the seen classes and rebalanced after every task.
Selection (on L2-normalised features of the un-augmented images):
- herding (Welling 2009, as in iCaRL): greedily add the sample that keeps the exemplar mean closest to the
  class mean;
- closest_to_mean: the samples nearest to the class mean;
- random: a random subset, drawn from a generator seeded by (run seed, class), so resuming redraws the same.

`ReservoirBuffer` (DER/DER++) keeps a reservoir sample of the whole training stream instead: train-pool
positions with the logits computed when each sample was seen, as module buffers (so they move with the method
and are saved in its state_dict).
"""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from utils.precision import upcast
from utils.registry import InvalidState


def herding(features: torch.Tensor, m: int) -> np.ndarray:
    """Indices of m rows of L2-normalised `features` chosen by herding, in selection order."""
    mean = features.mean(0)
    running = torch.zeros_like(mean)
    available = torch.ones(len(features), dtype=torch.bool)
    chosen = []
    for k in range(1, min(m, len(features)) + 1):
        dist = torch.linalg.vector_norm(mean - (running + features) / k, dim=1)
        dist[~available] = float("inf")
        i = int(torch.argmin(dist))
        chosen.append(i)
        available[i] = False
        running += features[i]
    return np.asarray(chosen, dtype=np.int64)


def closest_to_mean(features: torch.Tensor, m: int) -> np.ndarray:
    dist = torch.linalg.vector_norm(features - F.normalize(features.mean(0), dim=0), dim=1)
    return torch.argsort(dist)[:m].numpy()


class FeatureCache:
    """`features_of(positions)` for train-pool positions: the features of a position are computed once, the
    first time it is asked for (in one inference pass over every position not seen yet), then looked up, so
    exemplar selection and class means share the pass over the new classes."""

    def __init__(self, compute: Callable[[np.ndarray], torch.Tensor]):
        self.compute = compute
        self.positions, self.features = np.zeros(0, dtype=np.int64), None

    def __call__(self, positions) -> torch.Tensor:
        positions = np.asarray(positions, dtype=np.int64)
        missing = np.setdiff1d(positions, self.positions)
        if len(missing):
            new = self.compute(missing)
            merged = np.concatenate([self.positions, missing])
            features = new if self.features is None else torch.cat([self.features, new])
            order = np.argsort(merged, kind="stable")
            self.positions, self.features = merged[order], features[torch.from_numpy(order)]
        return self.features[torch.from_numpy(np.searchsorted(self.positions, positions))]


class ExemplarMemory:
    def __init__(self, memory_size: int, fixed_memory: bool, memory_per_class: int | None, sampling_method: str,
                 n_classes: int, seed: int):
        self.memory_size, self.fixed_memory = memory_size, fixed_memory
        self.memory_per_class, self.sampling_method = memory_per_class, sampling_method
        self.n_classes, self.seed = n_classes, seed
        self.exemplars: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(cls, cfg, n_classes: int, seed: int) -> "ExemplarMemory | None":
        """The configured memory, or None when it holds nothing (memory_size 0 and no per-class quota)."""
        if cfg.memory_size == 0 and not (cfg.fixed_memory and cfg.memory_per_class):
            return None
        return cls(cfg.memory_size, cfg.fixed_memory, cfg.memory_per_class, cfg.sampling_method, n_classes, seed)

    def quota(self, n_seen: int) -> int:
        if self.fixed_memory:
            return self.memory_per_class or self.memory_size // self.n_classes
        return self.memory_size // n_seen

    def __len__(self) -> int:
        return sum(len(v) for v in self.exemplars.values())

    def indices(self) -> np.ndarray:
        """Train-pool positions of every exemplar, class by class."""
        parts = [self.exemplars[c] for c in sorted(self.exemplars)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def update(self, classes, n_seen: int, data, features_of: Callable) -> None:
        """Shrink the old classes to the new quota, then select exemplars of `classes`.

        `features_of(positions)` returns the features of those train-pool samples, un-augmented (the shared
        inference loop, e.g. through a `FeatureCache`); it is called once for all new classes, and not at all for
        random selection."""
        m = self.quota(n_seen)
        for c in self.exemplars:
            self.exemplars[c] = self.exemplars[c][:m]
        pools = {int(c): data.indices("train", [c]) for c in classes}
        features = None
        if m > 0 and self.sampling_method not in ("random", "reservoir") and any(len(p) > m for p in pools.values()):
            everything = np.concatenate(list(pools.values()))
            features = F.normalize(upcast(features_of(everything)), dim=1)
        start = 0
        for c, pool in pools.items():
            part = None if features is None else features[start: start + len(pool)]
            self.exemplars[c] = pool[self.select(part, len(pool), m, c)]
            start += len(pool)

    def select(self, features: torch.Tensor | None, n: int, m: int, c: int) -> np.ndarray:
        """Positions (within the class pool of size n) of the m exemplars to keep, in priority order."""
        if m >= n:
            return np.arange(n)
        if m == 0:
            return np.zeros(0, dtype=np.int64)
        if self.sampling_method in ("random", "reservoir"):
            return np.random.default_rng([self.seed, c]).permutation(n)[:m]
        return herding(features, m) if self.sampling_method == "herding" else closest_to_mean(features, m)

    def balanced_indices(self, task, data, features_of: Callable) -> np.ndarray:
        """Train-pool positions of a class-balanced set (DER, ACL and DynaMMo's second stage): the exemplars of the
        old classes and as many of each new class, selected the memory's way; the memory itself is unchanged."""
        balanced = copy.copy(self)
        balanced.exemplars = dict(self.exemplars)
        balanced.update(task.classes, task.total, data, features_of)
        return balanced.indices()

    def class_means(self, data, features_of: Callable) -> torch.Tensor:
        """L2-normalised mean of the normalised exemplar features, one row per class 0..max (iCaRL's NME)."""
        idx = self.indices()
        features = F.normalize(upcast(features_of(idx)), dim=1)
        labels = torch.as_tensor(data.train_y[idx])
        n = int(labels.max()) + 1
        sums = torch.zeros(n, features.shape[1]).index_add_(0, labels, features)
        return F.normalize(sums / torch.bincount(labels, minlength=n).clamp(min=1)[:, None], dim=1)

    def state_dict(self) -> dict:
        return {"exemplars": {int(c): torch.as_tensor(v) for c, v in self.exemplars.items()}}

    def load_state_dict(self, state: dict, seen: int | None = None, pool: int | None = None) -> None:
        """Load a saved `state_dict()`, after checking that it is one: integer train-pool positions (inside a pool
        of `pool` samples) of classes 0..seen-1. Raises InvalidState otherwise, and then loads nothing."""
        exemplars = state.get("exemplars") if isinstance(state, dict) else None
        if not isinstance(exemplars, dict):
            raise InvalidState("holds a memory without exemplars")
        for c, positions in exemplars.items():
            if not isinstance(c, (int, np.integer)) or (seen is not None and not 0 <= int(c) < seen):
                raise InvalidState(f"holds exemplars of class {c!r}, but only classes 0..{seen - 1} are seen by then")
            if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.is_floating_point() \
                    or positions.dtype == torch.bool:
                raise InvalidState(f"holds exemplars of class {c} that are not a list of train-pool positions")
            if pool is not None and len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= pool):
                raise InvalidState(f"holds exemplars of class {c} outside the train pool (0..{pool - 1})")
        self.exemplars = {int(c): v.numpy() for c, v in exemplars.items()}


def reservoir_slots(n_seen: int, batch: int, size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reservoir sampling for `batch` new items after `n_seen`: item b (the (n_seen+b+1)-th seen) goes to slot
    n_seen+b while the buffer fills, else to slot j ~ U{0..n_seen+b} if j < size. Returns (slots, items): the
    buffer slots to write and the batch position written into each (the later item wins a repeated slot)."""
    seen = n_seen + torch.arange(batch, device=device)
    draw = torch.minimum((torch.rand(batch, device=device) * (seen + 1)).long(), seen)
    slot = torch.where(seen < size, seen, draw)
    kept = torch.nonzero(slot < size).squeeze(1)
    last = torch.full((size,), -1, dtype=torch.long, device=device).scatter_reduce(0, slot[kept], kept, "amax")
    slots = torch.nonzero(last >= 0).squeeze(1)
    return slots, last[slots]


class ReservoirBuffer(nn.Module):
    """`size` slots of (train-pool position, logits over `n_classes`), filled by reservoir sampling: every sample
    of the stream has the same chance size / n_seen of being held."""

    def __init__(self, size: int, n_classes: int):
        super().__init__()
        self.register_buffer("index", torch.zeros(size, dtype=torch.long))
        self.register_buffer("logits", torch.zeros(size, n_classes))
        self.register_buffer("n_seen", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return min(int(self.n_seen), len(self.index))

    @torch.no_grad()
    def add(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """Offer a batch of samples (their pool positions and logits) to the reservoir."""
        slots, items = reservoir_slots(int(self.n_seen), len(positions), len(self.index), positions.device)
        self.index[slots] = positions[items]
        self.logits[slots] = upcast(logits)[items]
        self.n_seen += len(positions)

    def sample(self, size: int) -> torch.Tensor:
        """Up to `size` distinct random filled slots."""
        return torch.randperm(len(self))[:size].to(self.index.device)
