"""DynaMMo: Dynamic Model Merging for efficient class-incremental learning for medical images (Qazi, Almakky,
Hashmi, Sanjeev, Yaqub; MIUA 2024, arXiv 2404.14099).

Idea: ACL's training (methods/multi_steps/acl.py: task-specific adapters in a frozen backbone, per-task heads
with an "others" output, a balanced fine-tuning of all heads), but the task adapters are merged into one set
after each task's adapter stage, so inference is a single backbone pass whose features all T heads share:

    after stage 1 of task t:  A_merged[p] = (1 / (t + 1)) sum_{i <= t} A_i[p]      (every entry, at every point p)
    stage 2 and test:         f = backbone_{A_merged}(x);   head i reads f;  min-others routing as in ACL

The merged adapters are computed once and kept (as parameters of the network, so checkpoints hold them), never
re-averaged per forward: the test-time cost is stem + backbone + one adapter set + T tiny heads, flat in T,
where ACL pays for T adapted paths. The per-task adapters stay stored: the next task starts from task t's own
(un-merged) adapters and the merge is recomputed over all of them.

Its premise is a backbone whose features already separate the classes, so that each task's adapters are a small
correction that averaging keeps (the paper: an ImageNet-pretrained ResNet-18). On digits (benchmarks/
tables/dynammo_merging.py, docs/results.md) the mean merge is within a point of ACL on a MoCo v2 backbone and about ten
points behind on a weaker SimSiam one or on a backbone that learnt only the first task.

Choices where the paper is silent, and deviations:
- Merge weights are uniform; every parameter is averaged, alpha included (`merge_strategy: mean`, the default).
  BN running statistics are averaged too (the original's evident intent), or, with `recalibrate_bn: true`,
  re-estimated as the plain average over the batches of the un-augmented balanced set passed through the merged
  path in train mode (from the second task on; after the first task the merge is the task's own adapter set).

Beyond the paper (all keep the single merged pass at test time; formulas in backbone/adapters.py):
- `merge_strategy`: `mean` (the paper's), `task_arithmetic` (Ilharco et al., ICLR 2023), `ties` (trim, elect
  sign, disjoint mean; Yadav et al., NeurIPS 2023) or `magmax` (per entry the task vector of largest magnitude;
  Marczak et al., ECCV 2024). The task vectors are each task's whole adapter set minus the first task's, the
  stored reference point (why not the initialisation: see backbone/adapters.py). `merge_lambda` scales the merged
  task vector; unset, it is TIES's recommended 1.0, MagMax's 0.5 (its authors' scripts) and 0.5 for task
  arithmetic (whose paper picks it on validation data, which a continual learner does not have); `ties_keep` is
  TIES's k (the share of each task vector kept, 0.2 as in the paper).
- `alpha_merge`: the adapters' output scale alpha is a single number per adapter whose sign the tasks choose
  freely (-0.92 and +0.06 at the same point on digits), so averaging it can cancel every task's correction.
  `strategy` merges it like every other parameter (the paper's mean), `newest` takes the newest task's.
- `adapter_init: first` (ACL's key): every task starts from the first task's adapters instead of the previous
  task's, so that all task vectors share one starting point (ACMap, Fukuda et al., CVPR 2025, arXiv 2412.18219).
- `finetune_merged: true`: stage 2 trains the merged adapters together with the heads (same optimiser and
  learning rate), on the balanced set; the next task's merge starts again from the task adapters.
- The merge is an `Action` between the adapter stage and the head stage, because stage 2 must train the heads
  on the merged features; the merged adapters are parameters of the network, so a run resumed in stage 2 loads
  them from the checkpoint instead of merging again.
- The original repository's DynaMMo cannot be loaded (a misspelt class, an unimportable file, an undefined
  averaging function) and its merged forward still replicated the batch T times; this is a single pass.
- Everything else (heads, losses, stages, scores, memory) is ACL's, deviations included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from backbone.adapters import MERGE_STRATEGIES, MERGED, bn_recalibration
from methods import register_method
from methods.multi_steps.acl import ACL, ACLConfig
from utils.config import key
from utils.types import Action

#: lambda of each strategy when merge_lambda is not set (see the module docstring)
DEFAULT_LAMBDA = {"mean": 1.0, "task_arithmetic": 0.5, "ties": 1.0, "magmax": 0.5}


@dataclass(frozen=True)
class DynaMMoConfig(ACLConfig):
    recalibrate_bn: bool = key(False, "re-estimate the merged adapters' BN statistics on the balanced set "
                                      "instead of averaging the task adapters' statistics")
    merge_strategy: str = key("mean", "how the task adapters are merged (mean: the paper's)", MERGE_STRATEGIES)
    merge_lambda: Optional[float] = key(None, "scale of the merged task vector (task_arithmetic, ties, magmax; "
                                              "default: task_arithmetic 0.5, ties 1.0, magmax 0.5)",
                                        range="[0, inf)")
    ties_keep: float = key(0.2, "ties: share of each task vector's entries kept after trimming (TIES's k)",
                           range="(0, 1]")
    alpha_merge: str = key("strategy", "each adapter's scale alpha: merged like every other parameter, or the "
                                       "newest task's", ("strategy", "newest"))
    finetune_merged: bool = key(False, "stage 2 trains the merged adapters together with the heads")


@register_method("dynammo", config=DynaMMoConfig)
class DynaMMo(ACL):
    merge_adapters = True

    def consolidation(self, balanced, infer):
        return [Action("merge", lambda: self.merge(balanced(), infer))]

    def merge(self, balanced, infer) -> None:
        """Merge the task adapters into the merged set (and re-estimate its BN statistics on the balanced set)."""
        cfg = self.cfg
        lam = DEFAULT_LAMBDA[cfg.merge_strategy] if cfg.merge_lambda is None else cfg.merge_lambda
        self.network.merge(cfg.merge_strategy, lam, cfg.ties_keep, cfg.alpha_merge)
        if cfg.recalibrate_bn and balanced is not None:
            with bn_recalibration(self.network.merged):
                infer(self._calibration_pass, self.data.dataset("train", balanced, augment=False), self.network,
                      whole=True)  # every rank re-estimates the same statistics

    def paths(self):
        """One pass through the merged adapters, whatever the number of tasks."""
        return [MERGED]

    def heads_stage_trains(self):
        return [self.network.heads, self.network.merged] if self.cfg.finetune_merged else [self.network.heads]

    def heads_stage_features(self, x):
        if self.cfg.finetune_merged:
            return self.network.forward_paths(x, [MERGED])
        return super().heads_stage_features(x)

    def _calibration_pass(self, x):
        self.network.merged.train()  # batch statistics feed the running averages
        return self.network.forward_paths(x, [MERGED])[0]
