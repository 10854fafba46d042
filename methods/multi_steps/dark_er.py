"""DER / DER++: Dark Experience Replay (Buzzega, Boschini, Porrello, Abati, Calderara; NeurIPS 2020).

Idea: keep a reservoir sample of the whole training stream together with the network's logits at the time each
sample was seen, and replay both: matching the stored logits (the "dark knowledge") with an MSE keeps the old
function, without a teacher network or task boundaries. DER++ adds a CE on the labels of a second buffer batch.

    loss = CE(z, y) + alpha * MSE(h(x'), z') [+ beta * CE(h(x''), y'')],  (x', z'), (x'', y'') ~ buffer

The buffer is filled by reservoir sampling after every training step (every seen sample has the same chance
memory_size / n_seen of being in it); the head covers every class of the dataset from the start, as in the paper.
`beta: 0` gives plain DER.

Deviations and choices:
- The buffer holds train-pool positions and stored logits (tensors) and the reservoir counter (an int in the
  extra state), so it is checkpointed; replayed images and their labels are re-read from the DataManager, the
  images with the train augmentation, as in the paper and the original. `train_data` yields each sample's pool
  position beside (x, y), which the shared loop passes on to `training_step`.
- Replay batches have `replay_batch_size` samples (default batch_size), drawn without replacement.
- `incre_type: til` uses CE within each sample's own task (the original is cil only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from methods import register_method
from methods.base import Method
from utils.config import key
from utils.losses import class_task_bounds, task_ce
from utils.registry import UserError


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


class _WithPoolIndex(Dataset):
    """A dataset that also yields each sample's train-pool position (the buffer stores positions)."""

    def __init__(self, dataset, positions):
        self.dataset, self.positions = dataset, positions

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], int(self.positions[i]))


@dataclass
class DarkERConfig:
    alpha: float = key(0.3, "weight of the MSE between the logits on buffer samples and the stored logits")
    beta: float = key(0.5, "weight of the CE on a second buffer batch (DER++); 0 gives plain DER")


@register_method("dark_er", config=DarkERConfig)
class DarkER(Method):
    def __init__(self, cfg, data):
        if cfg.memory_size <= 0 or cfg.sampling_method != "reservoir" or cfg.apply_nme:
            raise UserError("dark_er keeps a reservoir buffer of logits: set memory_size > 0, sampling_method: "
                            "reservoir and apply_nme: false")
        super().__init__(cfg, data)
        self.memory = None  # the logit reservoir below replaces the exemplar memory
        self.n_seen = 0
        self.register_buffer("buffer_index", torch.zeros(cfg.memory_size, dtype=torch.long))
        self.register_buffer("buffer_logits", torch.zeros(cfg.memory_size, data.n_classes))
        self.register_buffer("class_bounds", class_task_bounds(data.tasks), persistent=False)

    def before_task(self, task):
        self.network.expand_head(self.data.n_classes)

    def train_data(self, task, new_data):
        return _WithPoolIndex(new_data, self.data.indices("train", task.classes))

    def training_step(self, x, y, position):
        logits = self.network(x)["logits"]
        losses = {"ce": self._ce(logits, y)}
        if self.n_seen > 0:
            bx, _, stored = self._buffer_batch()
            losses["mse"] = self.cfg.alpha * F.mse_loss(self.network(bx)["logits"].float(), stored)
            if self.cfg.beta > 0:
                bx, by, _ = self._buffer_batch()
                losses["buffer_ce"] = self.cfg.beta * self._ce(self.network(bx)["logits"], by)
        slots, items = reservoir_slots(self.n_seen, len(y), len(self.buffer_index), y.device)
        self.buffer_index[slots] = position[items]
        self.buffer_logits[slots] = logits.detach().float()[items]
        self.n_seen += len(y)
        return losses

    def _ce(self, logits, y):
        if self.cfg.incre_type == "til":
            return task_ce(logits, y, self.class_bounds)
        return F.cross_entropy(logits, y)

    def _buffer_batch(self):
        """(images with the train augmentation, labels, stored logits) of a random buffer batch."""
        filled = min(self.n_seen, len(self.buffer_index))
        size = min(self.cfg.replay_batch_size or self.cfg.batch_size, filled)
        slots = torch.randperm(filled)[:size].to(self.buffer_index.device)
        dataset = self.data.dataset("train", self.buffer_index[slots].cpu().numpy())
        images, labels = zip(*(dataset[i] for i in range(size)))  # at most replay_batch_size decodes
        device = self.buffer_logits.device
        return torch.stack(images).to(device), torch.as_tensor(labels, device=device), self.buffer_logits[slots]

    def extra_state(self) -> dict:
        return {**super().extra_state(), "n_seen": self.n_seen}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.n_seen = int(state.get("n_seen", 0))
