"""Finetune: plain fine-tuning task after task, the lower bound of class-incremental learning.

Idea: train the whole network with cross-entropy on the classes seen so far, task by task, with no measure
against forgetting. With `memory_size > 0` the exemplar memory (herding by default) is replayed with the new
data ("Finetune + replay", a simple rehearsal baseline, cf. Rebuffi et al. CVPR 2017 without distillation).

Deviations from the original code: none in the algorithm. The memory exists iff `memory_size > 0` (the
original decided by whether `fixed_memory` was set at all); `incre_type: til` trains CE within the task.
"""
from methods import register_method
from methods.base import Method


@register_method("finetune_il")
class FinetuneIL(Method):
    def training_step(self, x, y):
        return {"ce": self.seen_logits_ce(self.network(x)["logits"], y)}
