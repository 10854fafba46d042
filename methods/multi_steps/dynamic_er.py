"""DER: Dynamically Expandable Representation for class-incremental learning (Yan, Xie, He; CVPR 2021),
without the channel-pruning step.

Idea: freeze what was learnt and grow the representation. Each task adds a new feature extractor, initialised
from the previous one; the old extractors are frozen, and a single classifier reads all features concatenated.
An auxiliary head on the new extractor alone separates the new classes from "any old class", which pushes the
new extractor to learn what the old ones do not already encode. After the task, the classifier is re-trained
from scratch on a class-balanced set (the memory plus as many samples of each new class), which removes the
bias towards the new classes:

    stage 1:  loss = CE(fc([f_1 .. f_t](x))[:, :seen], y) + others_CE(aux(f_t(x)), y)       (t > 0 for aux)
    stage 2:  loss = CE(fc'([f_1 .. f_t](x)) / T, y)   on the balanced set, only the fresh classifier fc' trains

Inference runs every extractor: its cost grows linearly with the number of tasks.

Deviations from the paper / the original code:
- No pruning (as in the original code, "DER w/o P"). The auxiliary head's "old" output is its last output (the
  original uses output 0; the head is new each task, so this only renames a column).
- The auxiliary loss is used from the second task on (with a single task there is no "old" class).
- The re-balanced classifier fc' is created fresh at the start of the task and copied into the network's
  classifier after stage 2, so that no weight changes between the stages (checkpoint rule); the original
  re-initialised its classifier in place. Stage 2: SGD (momentum 0.9, no weight decay, as in the original),
  `lrate_finetune`, MultiStepLR at `milestones_finetune` with factor `lrate_decay`.
- DER needs a replay memory (`memory_size > 0`): without it stage 2 has no old class to balance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from backbone.der_net import DERNet
from methods import register_method
from methods.base import BalancedStageConfig, Method
from utils.config import key
from utils.losses import others_cross_entropy
from utils.precision import upcast


@dataclass(frozen=True)
class DERConfig(BalancedStageConfig):
    T: float = key(5.0, "temperature of the balanced fine-tuning loss CE(logits / T)", range="(0, inf)")
    epochs_finetune: int = 30
    lrate_finetune: float = 0.05


@register_method("dynamic_er", config=DERConfig)
class DER(Method):
    replay = "required"
    network_class = DERNet

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        self.balanced_fc: nn.Linear | None = None

    def before_task(self, task):
        """The network has grown the task's extractor and classifier; the fresh classifier of stage 2."""
        if not task.is_first:
            fc = self.network.fc
            self.balanced_fc = nn.Linear(fc.in_features, fc.out_features).to(fc.weight.device).requires_grad_(False)

    def stages(self, task, new_data, infer):
        stages = super().stages(task, new_data, infer)
        if task.is_first:
            return stages
        return [*stages, self.balanced_stage("balance", lambda: self.balanced_set(task, infer), self.balance_step,
                                             lambda: [self.balanced_fc], opt_type="sgd", opt_mom=0.9, nesterov=False,
                                             weight_decay=0.0, scheduler="multi_step")]

    def training_step(self, x, y):
        out = self.network(x)
        losses = {"ce": self.ce(out["logits"], y)}
        if "aux_logits" in out:
            losses["aux_ce"] = others_cross_entropy(out["aux_logits"], y, self.task.known, self.task.total)
        return losses

    def balance_step(self, x, y):
        """Stage 2: the fresh classifier on the frozen features of the class-balanced set."""
        with torch.no_grad():
            features = self.network.features(x)
        return {"balanced_ce": F.cross_entropy(upcast(self.balanced_fc(features)) / self.cfg.T, y)}

    def after_task(self, task, infer):
        """The re-balanced classifier replaces the network's (the memory is then updated on its features)."""
        if self.balanced_fc is not None:
            with torch.no_grad():
                self.network.fc.load_state_dict(self.balanced_fc.state_dict())
