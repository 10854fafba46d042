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

Choices where the paper is silent, and deviations:
- Merge weights are uniform; every parameter is averaged, alpha included. BN running statistics are averaged
  too (the original's evident intent), or, with `recalibrate_bn: true`, re-estimated as the plain average over
  the batches of the un-augmented balanced set passed through the merged path in train mode (from the second
  task on; after the first task the merge is the task's own adapter set).
- The merge is an `Action` between the adapter stage and the head stage, because stage 2 must train the heads
  on the merged features; the merged adapters are parameters of the network, so a run resumed in stage 2 loads
  them from the checkpoint instead of merging again.
- The original repository's DynaMMo cannot be loaded (a misspelt class, an unimportable file, an undefined
  averaging function) and its merged forward still replicated the batch T times; this is a single pass.
- Everything else (heads, losses, stages, scores, memory) is ACL's, deviations included.
"""
from __future__ import annotations

from dataclasses import dataclass

from backbone.adapters import MERGED, bn_recalibration
from methods import register_method
from methods.multi_steps.acl import ACL, ACLConfig
from utils.config import key
from utils.types import Action


@dataclass
class DynaMMoConfig(ACLConfig):
    recalibrate_bn: bool = key(False, "re-estimate the merged adapters' BN statistics on the balanced set "
                                      "instead of averaging the task adapters' statistics")


@register_method("dynammo", config=DynaMMoConfig)
class DynaMMo(ACL):
    merge_adapters = True

    def consolidation(self, balanced, engine):
        return [Action("merge", lambda: self.merge(balanced(), engine))]

    def merge(self, balanced, engine) -> None:
        """Average the task adapters into the merged set (and re-estimate its BN statistics on the balanced set)."""
        self.network.merge()
        if self.cfg.recalibrate_bn and balanced is not None:
            with bn_recalibration(self.network.merged):
                engine.infer(self._calibration_pass, self.data.dataset("train", balanced, augment=False), self.network)

    def paths(self):
        """One pass through the merged adapters, whatever the number of tasks."""
        return [MERGED]

    def _calibration_pass(self, x):
        self.network.merged.train()  # batch statistics feed the running averages
        return self.network(x, [MERGED])[0]
