"""DER / DER++: Dark Experience Replay (Buzzega, Boschini, Porrello, Abati, Calderara; NeurIPS 2020).

Idea: keep a reservoir sample of the whole training stream together with the network's logits at the time each
sample was seen, and replay both: matching the stored logits (the "dark knowledge") with an MSE keeps the old
function, without a teacher network or task boundaries. DER++ adds a CE on the labels of a second buffer batch.

    loss = CE(z, y) + alpha * MSE(h(x'), z') [+ beta * CE(h(x''), y'')],  (x', z'), (x'', y'') ~ buffer

The buffer is filled by reservoir sampling after every training step (every seen sample has the same chance
memory_size / n_seen of being in it); the head covers every class of the dataset from the start, as in the paper.
`beta: 0` gives plain DER.

Deviations and choices:
- The buffer (utils.memory.ReservoirBuffer) holds train-pool positions, stored logits and the reservoir counter
  as buffers, so it is checkpointed; replayed images and their labels are re-read from the DataManager, the
  images with the train augmentation, as in the paper and the original. `train_data` yields each sample's pool
  position beside (x, y), which the shared loop passes on to `training_step`.
- Replay batches have `replay_batch_size` samples (default batch_size), drawn without replacement.
- `incre_type: til` uses CE within each sample's own task (the original is cil only).
- Distributed runs: every rank offers the whole global batch to its buffer, in the batch's order, and replays
  the same whole buffer batches (batch norm local there: `distributed.replicated`), so the buffers and the
  update equal one process's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from methods import register_method
from methods.base import Method
from utils import distributed
from utils.config import key
from utils.losses import bounded_ce
from utils.memory import ReservoirBuffer
from utils.precision import upcast
from utils.registry import UserError


@dataclass(frozen=True)
class DarkERConfig:
    alpha: float = key(0.3, "weight of the MSE between the logits on buffer samples and the stored logits",
                        range="[0, inf)")
    beta: float = key(0.5, "weight of the CE on a second buffer batch (DER++); 0 gives plain DER",
                       range="[0, inf)")


@register_method("dark_er", config=DarkERConfig)
class DarkER(Method):
    replay = "required"

    def build_memory(self):
        """The reservoir of logits replaces the exemplar memory."""
        if self.cfg.sampling_method != "reservoir":
            raise UserError("dark_er fills its buffer by reservoir sampling: set sampling_method: reservoir")
        return ReservoirBuffer(self.cfg.memory_size, self.data.n_classes) if self.cfg.memory_size > 0 else None

    def build_network(self):
        """The head covers every class of the dataset from the start, as in the paper (so the network does not
        grow with the tasks)."""
        network = super().build_network()
        network.expand_head(self.data.n_classes)
        return network

    def train_data(self, task, new_data):
        return new_data.with_positions()  # the buffer stores train-pool positions

    def training_step(self, x, y, position):
        logits = self.network(x)["logits"]
        losses = {"ce": self._ce(logits, y)}
        if len(self.memory) > 0:
            with distributed.replicated():  # every rank replays the same whole buffer batches
                bx, _, stored = self._buffer_batch()
                losses["mse"] = self.cfg.alpha * F.mse_loss(upcast(self.network(bx)["logits"]), stored)
                if self.cfg.beta > 0:
                    bx, by, _ = self._buffer_batch()
                    losses["buffer_ce"] = self.cfg.beta * self._ce(self.network(bx)["logits"], by)
        # every rank adds the whole global batch in its order, so the buffers of a distributed run stay identical
        self.memory.add(distributed.gather_batch(position), distributed.gather_batch(logits.detach()))
        return losses

    def _ce(self, logits, y):
        """CE over every class of the dataset (the head covers them all from the start), or within the task (til)."""
        return bounded_ce(logits, y, *self.class_bounds(y, seen=self.data.n_classes))

    def _buffer_batch(self):
        """(images with the train augmentation, labels, stored logits) of a random buffer batch."""
        slots = self.memory.sample(self.cfg.replay_batch_size or self.cfg.batch_size)
        dataset = self.data.dataset("train", self.memory.index[slots].cpu().numpy())
        images, labels = dataset.batch(torch.arange(len(slots)), self.memory.logits.device)
        return images, labels, self.memory.logits[slots]
