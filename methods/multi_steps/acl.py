"""ACL: Adapter Learning in a pretrained feature extractor for continual learning of diseases (Zhang, Huang,
Zhang, Zou, Zheng, Wang; MICCAI 2023, arXiv 2304.09042).

Idea: keep a pretrained feature extractor fixed and give every task its own lightweight residual adapters
(backbone/adapters.py) and its own head, whose extra output "others" stands for every class outside the task.
Stage 1 trains the new task's adapters (initialised from the previous task's) and head on the new data plus the
replay memory, memory samples labelled "others". Stage 2 (from the second task on) fine-tunes all task heads
together on a class-balanced set, so that their outputs become comparable. At test time the sample goes
through every task's adapted path; the task is the head with the lowest "others" probability and the class is
that head's argmax:

    stage 1:  loss = others_CE(h_t(f_t(x)), y)                         (others_CE in methods/multi_steps/dynamic_er)
    stage 2:  loss = (1 / T) sum_i others_CE(h_i(f_i(x)), y)          on the balanced set, only the heads train
    test:     p_i = softmax(h_i(f_i(x))),  u_i = p_i[others],  t* = argmin_i u_i,  class = argmax p_t*[:n_t*]

Inference runs T adapted paths after the stem, so its cost grows linearly with the number of tasks.

Scores returned by `predict` ("cnn", over the seen classes): for class c of task i,
(1 - u_i) * p_i[c] / max_k p_i[k]. The argmax over all classes is exactly the min-others prediction, the argmax
inside one task is that head's argmax (so `incre_type: til` works), and the maximum score is 1 - min_i u_i,
the paper's open-set confidence (`openset_confidence`). "task_id" is t*.

Deviations from the paper / the original code:
- No separate auxiliary head: stage 1 trains the task's own head h_t, which stage 2 then starts from (the
  original trained an auxiliary copy and started stage 2 from a randomly initialised new head).
- The stage-2 loss is the mean over heads, not the sum, so its scale does not grow with T (Adam is nearly
  insensitive to it anyway). Stage 2: Adam, `lrate_finetune`, no weight decay, MultiStepLR at
  `milestones_finetune` with factor `lrate_decay`, `epochs_finetune` epochs, as in the original.
- New adapters are copied from the previous task's without the original's dummy forward in train mode (which
  pulled their BN statistics towards noise).
- Without pretrained weights (`pretrained: false`, `freeze_fe: false`) the backbone trains with the first
  task's adapters and is frozen from the second task on; the original always froze it.
- Stage 1 of the first task uses the `init_*` optimiser keys when they are set (the original ignored them).
- A replay memory is required (the "others" class is learnt from it); NME is not supported (the paper has none).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from backbone import build_backbone
from backbone.adapters import AdapterNet
from methods import register_method
from methods.base import Method
from methods.multi_steps.dynamic_er import others_cross_entropy
from utils.config import key
from utils.registry import UserError
from utils.train_loop import OptimConfig


@dataclass
class ACLConfig:
    layer_names: list[str] = key(["layer1", "layer2", "layer3", "layer4"],
                                 "backbone modules that get an adapter before them (resnet18: layer1..layer4; "
                                 "mobilenet_v2: features.3 .5 .12 .15; resnet32: stage_1..stage_3)")
    epochs_finetune: int = key(50, "epochs of the head re-balancing stage (tasks after the first)")
    lrate_finetune: float = key(0.001, "Adam learning rate of the head re-balancing stage")
    milestones_finetune: list[int] = key([15, 35], "multi_step milestones of the head re-balancing stage")


@register_method("acl", config=ACLConfig)
class ACL(Method):
    merge_adapters = False  # DynaMMo: the network also holds the averaged adapters

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        if self.memory is None:
            raise UserError(f"{cfg.method} learns its 'others' class from replayed samples: set memory_size > 0")
        if cfg.apply_nme:
            raise UserError(f"{cfg.method} classifies with its task heads; set apply_nme: false")
        self.stage = "adapters"

    def build_network(self):
        backbone = build_backbone(self.cfg.backbone, self.cfg.pretrained, self.cfg.pretrain_path)
        return AdapterNet(backbone, self.cfg.layer_names, self.data.img_size, merged=self.merge_adapters)

    def before_task(self, task):
        self.network.requires_grad_(False)
        self.network.add_task(task.total - task.known)  # the new adapters and head are trainable
        if task.is_first and not (self.cfg.pretrained or self.cfg.freeze_fe):
            self.network.backbone.requires_grad_(True)

    def train_task(self, task, new_data, engine):
        self.stage = "adapters"
        super().train_task(task, new_data, engine)
        self.network.requires_grad_(False)
        self.network.heads.requires_grad_(True)
        balanced = None
        if not task.is_first:
            balanced = self.memory.balanced_indices(task, self.data, self.newest_features(engine))
        self.consolidate(balanced, engine)
        if balanced is None:
            return
        self.stage = "heads"
        opt = OptimConfig.from_config(self.cfg, first_task=False).replace(
            epochs=self.cfg.epochs_finetune, lrate=self.cfg.lrate_finetune, opt_type="adam", weight_decay=0.0,
            scheduler="multi_step", milestones=tuple(self.cfg.milestones_finetune))
        engine.fit(self, self.data.dataset("train", balanced), opt, stage="heads")

    def consolidate(self, balanced, engine) -> None:
        """Between the two stages: nothing for ACL (DynaMMo merges the adapters here)."""

    def paths(self) -> list:
        """The adapter paths inference runs: one per task."""
        return list(range(self.network.n_tasks))

    def training_step(self, x, y):
        if self.stage == "adapters":
            features = self.network(x, [self.task.index])[0]
            return {"ce": others_cross_entropy(self.network.heads[-1](features), y, self.task.known, self.task.total)}
        with torch.no_grad():
            features = self.network(x, self.paths())
        losses = [others_cross_entropy(z, y, t.known, t.total) for z, t in zip(self.head_logits(features),
                                                                                  self.data.tasks)]
        return {"heads_ce": torch.stack(losses).mean()}

    def after_task(self, task, engine):
        self.memory.update(task.classes, task.total, self.data, self.newest_features(engine))

    def predict(self, x):
        probs = [F.softmax(z.float(), dim=1) for z in self.head_logits(self.network(x, self.paths()))]
        scores = [(1 - p[:, -1:]) * p[:, :-1] / p[:, :-1].max(1, keepdim=True).values for p in probs]
        return {"cnn": torch.cat(scores, 1), "task_id": torch.stack([p[:, -1] for p in probs], 1).argmin(1)}

    def openset_confidence(self, scores):
        """1 - min_i u_i, the lowest "others" probability over the heads (the maximum of the scores)."""
        return scores["cnn"].max(1).values

    # ---- helpers ----
    def head_logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Head i on path i's features, or on the single shared path's."""
        return [head(features[i if len(features) > 1 else 0]) for i, head in enumerate(self.network.heads)]

    def newest_features(self, engine):
        """features_of(dataset) through the newest task's adapters (exemplar and balanced-set selection)."""
        newest = self.network.n_tasks - 1
        return lambda dataset: engine.infer(lambda x: self.network(x, [newest])[0], dataset, self.network)[0]
