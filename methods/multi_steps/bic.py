"""BiC: Large Scale Incremental Learning (Wu, Chen, Wang, Ye, Liu, Guo, Fu; CVPR 2019).

Idea: with rehearsal the classifier is biased towards the new classes, because they have far more samples than
the old ones in the exemplar memory. BiC holds out a small class-balanced validation set from the new data and
the exemplars and trains in two stages per task (after the first):
1. the network on the rest, with distillation from the previous model weighted by the share of old classes:
   loss = (1 - lam) * CE(z[:, :seen], y) + lam * KD_T(z[:, :known], z_old),  lam = known / seen;
2. a bias layer for the newest task's logits, z_new <- alpha * z_new + beta (two scalars), with CE on the
   validation set while everything else is frozen. Earlier tasks' bias layers keep their fitted values.
The bias layers live in `backbone.bias_layer.BiasCorrectedNet`; the teacher is the whole previous network,
bias layers included.

Deviations:
- The original applies stage 2's CE to softmax outputs (a double softmax); we apply it to the corrected logits,
  as in the paper.
- The held-out split: per class (old and new) `int(split_ratio * m)` samples, m the exemplars per old class when
  the task starts (the original: split_ratio * memory_size / known classes, the same number for non-fixed
  memory), at least one, drawn from a generator seeded by (run seed, task), so a rerun holds out the same.
- Stage 2 has its own keys (`epochs_bias`, `lrate_bias`, `batch_size_bias`): the held-out set is small (20-40
  samples on digits, 2000 on CIFAR-100 B10), so the original's reuse of stage 1's epochs and batch size gave
  about one step per epoch and left alpha near 1. By default every step is full-batch on the whole held-out set
  (the paper fits the two parameters on it; `batch_size_bias: 0`). SGD with momentum 0.9, a cosine schedule and
  no weight decay (which would pull alpha towards 0); the frozen network runs in eval mode, so its BN statistics
  do not move.
- `pretrain_path` and `freeze_fe` are honoured (the original ignores them for BiC).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from backbone.bias_layer import BiasCorrectedNet
from methods import register_method
from methods.base import Method
from utils.config import key
from utils.losses import weighted_kd_losses
from utils.types import OptimConfig, Stage

log = logging.getLogger("cl")


def balanced_split(pool: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator):
    """Split `pool` into (rest, held_out) with `per_class` random samples of every label held out."""
    order = np.lexsort((rng.random(len(pool)), labels))  # by label, random within a label
    sorted_labels = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels)  # position within its label
    held = np.zeros(len(pool), dtype=bool)
    held[order[rank < per_class]] = True
    return pool[~held], pool[held]


@dataclass(frozen=True)
class BiCConfig:
    T: float = key(2.0, "distillation temperature", range="(0, inf)")
    split_ratio: float = key(0.1, "share of the per-class exemplar quota held out per class for bias correction",
                              range="(0, 1)")
    epochs_bias: int = key(100, "epochs of the bias-correction stage (stage 2), each one step with the default "
                                "full batch", range="[1, inf)")
    lrate_bias: float = key(0.05, "learning rate of the bias-correction stage (SGD, momentum 0.9, cosine schedule)",
                            range="(0, inf)")
    batch_size_bias: int = key(0, "batch size of the bias-correction stage; 0: the whole held-out set in one batch",
                               range="[0, inf)")


@register_method("bic", config=BiCConfig)
class BiC(Method):
    replay = "required"
    distills = True
    network_class = BiasCorrectedNet

    def before_task(self, task):
        self.network.bias_layers.requires_grad_(False)  # only the bias stage trains (the newest) one

    def stages(self, task, new_data, infer):
        opt = OptimConfig.from_config(self.cfg, task.is_first)
        if task.is_first:  # nothing to correct yet
            return [Stage("train", lambda: new_data, opt, self.training_step)]
        pool = np.concatenate([self.memory.indices(), self.data.indices("train", task.classes)])
        per_class = max(1, int(self.cfg.split_ratio * self.memory.quota(task.known)))
        rng = np.random.default_rng([self.data.seed, task.index])
        train_idx, val_idx = balanced_split(pool, self.data.train_y[pool], per_class, rng)
        bias_opt = OptimConfig(epochs=self.cfg.epochs_bias, lrate=self.cfg.lrate_bias,
                               batch_size=self.cfg.batch_size_bias or len(val_idx), opt_type="sgd", opt_mom=0.9,
                               weight_decay=0.0, scheduler="cos")
        return [Stage("train", lambda: self.data.dataset("train", train_idx), opt, self.training_step),
                Stage("bias", lambda: self.data.dataset("train", val_idx), bias_opt, self.bias_step,
                      trains=lambda: [self.network.bias_layers[-1]])]

    def training_step(self, x, y):
        logits, old_logits = self.logits_and_old(x)
        logits = logits[:, : self.task.total]
        return weighted_kd_losses(self.ce(logits, y), logits, old_logits, self.cfg.T)

    def after_task(self, task, infer):
        if not task.is_first:
            layer = self.network.bias_layers[-1]
            log.info(f"task {task.index}: bias correction of the new classes' logits: alpha {float(layer.alpha):.4f}, "
                     f"beta {float(layer.beta):.4f}")

    def bias_step(self, x, y):
        """Stage 2: fit the newest task's (alpha, beta) on the held-out set, the network frozen."""
        with torch.no_grad():
            raw_logits = self.network(x)["raw_logits"]
        return {"bias_ce": self.ce(self.network.correct(raw_logits), y)}
