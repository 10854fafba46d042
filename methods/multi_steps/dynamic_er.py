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

from backbone import build_backbone
from backbone.der_net import DERNet
from methods import register_method
from methods.base import Method
from utils.config import key
from utils.registry import UserError
from utils.train_loop import OptimConfig


def others_cross_entropy(logits: torch.Tensor, y: torch.Tensor, known: int, total: int) -> torch.Tensor:
    """Cross-entropy of a head over the classes [known, total) plus a last "others" output:

        target_i = y_i - known   if known <= y_i < total,   else  n = total - known ("others")
        loss = mean_i CE(z_i, target_i)          z: (B, n + 1) logits"""
    inside = (y >= known) & (y < total)
    return F.cross_entropy(logits.float(), torch.where(inside, y - known, torch.full_like(y, total - known)))


@dataclass
class DERConfig:
    T: float = key(5.0, "temperature of the balanced fine-tuning loss CE(logits / T)")
    epochs_finetune: int = key(30, "epochs of the classifier re-balancing stage (tasks after the first)")
    lrate_finetune: float = key(0.05, "SGD learning rate of the re-balancing stage")
    milestones_finetune: list[int] = key([], "multi_step milestones of the re-balancing stage")


@register_method("dynamic_er", config=DERConfig)
class DER(Method):
    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        if self.memory is None:
            raise UserError("dynamic_er needs a replay memory for its balanced classifier stage: set memory_size > 0")
        self.balanced_fc: nn.Linear | None = None
        self.stage = "representation"

    def build_network(self):
        return DERNet(build_backbone(self.cfg.backbone, self.cfg.pretrained, self.cfg.pretrain_path))

    def before_task(self, task):
        self.network.add_task(task.known, task.total, None if task.is_first else self.network.fc)
        if self.cfg.freeze_fe:
            self.network.backbones.requires_grad_(False)
        if not task.is_first:
            fc = self.network.fc
            self.balanced_fc = nn.Linear(fc.in_features, fc.out_features).to(fc.weight.device).requires_grad_(False)

    def train_task(self, task, new_data, engine):
        self.stage = "representation"
        super().train_task(task, new_data, engine)
        if task.is_first:
            return
        features_of = lambda dataset: engine.features(self.network, dataset)  # noqa: E731
        balanced = self.data.dataset("train", self.memory.balanced_indices(task, self.data, features_of))
        self.network.requires_grad_(False)
        self.balanced_fc.requires_grad_(True)
        self.stage = "balance"
        opt = OptimConfig.from_config(self.cfg, first_task=False).replace(
            epochs=self.cfg.epochs_finetune, lrate=self.cfg.lrate_finetune, opt_type="sgd", opt_mom=0.9,
            nesterov=False, weight_decay=0.0, scheduler="multi_step", milestones=tuple(self.cfg.milestones_finetune))
        engine.fit(self, balanced, opt, stage="balance")

    def parameters_to_optimize(self):
        return self.parameters()  # the frozen part (per stage) is filtered out by requires_grad

    def training_step(self, x, y):
        if self.stage == "balance":
            with torch.no_grad():
                features = self.network(x)["features"]
            return {"balanced_ce": F.cross_entropy(self.balanced_fc(features).float() / self.cfg.T, y)}
        out = self.network(x)
        losses = {"ce": self.seen_logits_ce(out["logits"], y)}
        if "aux_logits" in out:
            losses["aux_ce"] = others_cross_entropy(out["aux_logits"], y, self.task.known, self.task.total)
        return losses

    def after_task(self, task, engine):
        if self.balanced_fc is not None:
            with torch.no_grad():
                self.network.fc.load_state_dict(self.balanced_fc.state_dict())
        super().after_task(task, engine)
