"""ACL: Adapter Learning in a pretrained feature extractor for continual learning of diseases (Zhang, Huang,
Zhang, Zou, Zheng, Wang; MICCAI 2023, arXiv 2304.09042).

Idea: keep a pretrained feature extractor fixed and give every task its own lightweight residual adapters
(backbone/adapters.py) and its own head, whose extra output "others" stands for every class outside the task.
Stage 1 trains the new task's adapters (initialised from the previous task's) and head on the new data plus the
replay memory, memory samples labelled "others". Stage 2 (from the second task on) fine-tunes all task heads
together on a class-balanced set, so that their outputs become comparable. At test time the sample goes
through every task's adapted path; the task is the head with the lowest "others" probability and the class is
that head's argmax:

    stage 1:  loss = others_CE(h_t(f_t(x)), y)                         (others_CE in utils/losses.py)
    stage 2:  loss = (1 / T) sum_i others_CE(h_i(f_i(x)), y)          on the balanced set, only the heads train
              (heads_per_batch: present, the original's: the sum over the heads whose task is in the batch only)
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
- Stage 2 trains every task head on every batch (`heads_per_batch: all`, the default). The original
  (GiantJun/CL_Pytorch, methods/multi_steps/acl.py, the stage-2 branch of `ACL._epoch_train`) adds head i's
  "others" CE only when the batch holds a sample of task i. `heads_per_batch: present` does that: the loss is
  (1 / T) times the sum over the present heads, so a present head gets the gradient it gets with `all` and an
  absent one none; in a distributed run presence is that of the whole global batch. We keep `all` because every
  balanced sample is a valid example for every head (one of its classes, or "others"), so no head loses its
  "others" examples to the draw of a batch, and because the two do not differ measurably: on digits
  (`python main.py --config options/acl/digits.yaml --seed 1 2 3 --heads_per_batch all|present`, AMD EPYC CPU,
  one thread, float32 weights under bfloat16 autocast, native on that CPU; about 1.5 to 2.5 min for the three
  seeds) `all` ends at last 92.69 ± 1.25, average incremental 95.48 ± 1.63, `present` at 92.87 ± 0.98,
  95.43 ± 1.56 (mean ± sample std over seeds 1, 2, 3; seeds 1 and 2 end at the same last accuracy). With about
  200 balanced samples in batches of 32, only about 5% of the batches miss a task (mostly the short last one),
  1.5% of the head updates.
- New adapters are copied from the previous task's without the original's dummy forward in train mode (which
  pulled their BN statistics towards noise). `adapter_init: first` copies the first task's instead (ACMap,
  Fukuda et al., arXiv 2412.18219; for DynaMMo's merges).
- Without pretrained weights (`pretrained: false`, `freeze_fe: false`) the backbone trains with the first
  task's adapters and is frozen from the second task on; the original always froze it.
- Stage 1 of the first task uses the `init_*` optimiser keys when they are set (the original ignored them).
- A replay memory is required (the "others" class is learnt from it); NME is not supported (the paper has none).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from backbone.adapters import AdapterNet
from methods import register_method
from methods.base import BalancedStageConfig, Method
from utils import distributed
from utils.config import key
from utils.losses import others_cross_entropy
from utils.precision import upcast
from utils.registry import UserError
from utils.types import OptimConfig, Stage


@dataclass(frozen=True)
class ACLConfig(BalancedStageConfig):
    layer_names: list[str] = key(["layer1", "layer2", "layer3", "layer4"],
                                 "backbone modules that get an adapter before them (resnet18: layer1..layer4; "
                                 "mobilenet_v2: features.3 .5 .12 .15; resnet32: stage_1..stage_3)")
    epochs_finetune: int = 50
    lrate_finetune: float = 0.001
    milestones_finetune: list[int] = key([15, 35])
    adapter_init: str = key("previous", "a new task's adapters start as a copy of the previous task's (the "
                                        "original) or of the first task's (ACMap)", ("previous", "first"))
    heads_per_batch: str = key("all", "stage 2: each batch trains every task head (all), or only the heads of "
                                      "the tasks with a sample in the batch (present: the original's); the loss "
                                      "is the sum of those heads' CEs over the number of tasks",
                               ("all", "present"))


@register_method("acl", config=ACLConfig)
class ACL(Method):
    replay = "required"  # the "others" class is learnt from replayed samples
    merge_adapters = False  # DynaMMo: the network also holds the averaged adapters

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        if cfg.apply_nme:
            raise UserError(f"{cfg.method} classifies with its task heads; set apply_nme: false")

    def build_network(self):
        return AdapterNet(self.make_backbone(), self.cfg.layer_names, self.data.img_size, merged=self.merge_adapters,
                          adapter_init=self.cfg.adapter_init)

    def before_task(self, task):
        """The network has grown the task's adapters and head (earlier ones frozen); the backbone learns only
        with the first task's adapters, and only when it is not pretrained."""
        self.network.freeze_backbone(not task.is_first or self.cfg.pretrained)

    def stages(self, task, new_data, infer):
        balanced = functools.cache(lambda: None if task.is_first else self.balanced_indices(task, infer))
        stages = [Stage("adapters", lambda: self.train_data(task, new_data),
                        OptimConfig.from_config(self.cfg, task.is_first), self.training_step),
                  *self.consolidation(balanced, infer)]
        if task.is_first:
            return stages
        return [*stages, self.balanced_stage("heads", lambda: self.data.dataset("train", balanced()), self.heads_step,
                                             self.heads_stage_trains, opt_type="adam", weight_decay=0.0,
                                             scheduler="multi_step")]

    def consolidation(self, balanced, infer) -> list:
        """Actions between the adapter and the head stage: none for ACL (DynaMMo merges the adapters here)."""
        return []

    def paths(self) -> list:
        """The adapter paths inference runs: one per task."""
        return list(range(self.network.n_tasks))

    def heads_stage_trains(self) -> list:
        """What learns in stage 2: every task head."""
        return [self.network.heads]

    def heads_stage_features(self, x):
        """The features stage 2 trains the heads on: every path, the adapters frozen."""
        with torch.no_grad():
            return self.network.forward_paths(x, self.paths())

    def training_step(self, x, y):
        """Stage 1: the new task's adapters and head (the network's newest path), memory samples labelled
        "others"."""
        return {"ce": others_cross_entropy(self.network(x)["logits"], y, self.task.known, self.task.total)}

    def heads_step(self, x, y):
        """Stage 2: the task heads on the class-balanced set (the adapters frozen, except DynaMMo's merged ones
        with finetune_merged): (1 / T) Σ_i others_CE_i over every head i (`heads_per_batch: all`) or over the
        heads whose task has a sample in the global batch (`present`; the others are not trained on it)."""
        logits = self.head_logits(self.heads_stage_features(x))
        tasks = self.data.tasks[:len(logits)]
        losses = [others_cross_entropy(z, y, t.known, t.total) for z, t in zip(logits, tasks)]
        if self.cfg.heads_per_batch == "all":
            return {"heads_ce": torch.stack(losses).mean()}
        labels = distributed.gather_batch(y)  # the tasks of the whole batch, so that every rank trains the same heads
        present = [loss for loss, t in zip(losses, tasks) if bool(((labels >= t.known) & (labels < t.total)).any())]
        return {"heads_ce": torch.stack(present).sum() / len(tasks)}

    def predict(self, x):
        logits = [upcast(z) for z in self.head_logits(self.network.forward_paths(x, self.paths()))]
        others = torch.stack([F.softmax(z, dim=1)[:, -1] for z in logits], 1)
        # (1 - u_i) * p_c / max_c p_c with p_c / max p = exp(z_c - max z): no 0 / 0 when every class probability
        # underflows next to a certain "others"
        scores = [(1 - u[:, None]) * torch.exp(z[:, :-1] - z[:, :-1].max(1, keepdim=True).values)
                  for z, u in zip(logits, others.unbind(1))]
        return {"cnn": torch.cat(scores, 1), "task_id": others.argmin(1)}

    def openset_confidence(self, scores):
        """1 - min_i u_i, the lowest "others" probability over the heads (the maximum of the scores)."""
        return scores["cnn"].max(1).values

    # ---- helpers ----
    def head_logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Head i on path i's features, or on the single shared path's."""
        return [head(features[i if len(features) > 1 else 0]) for i, head in enumerate(self.network.heads)]
