"""Finetune: plain fine-tuning with cross-entropy, in two registrations.

- `finetune_il` (multi_steps): train the whole network on the classes seen so far, task by task, with no
  measure against forgetting: the lower bound of class-incremental learning. With `memory_size > 0` the
  exemplar memory (herding by default) is replayed with the new data ("Finetune + replay", a simple rehearsal
  baseline, cf. Rebuffi et al. CVPR 2017 without distillation).
- `finetune_normal` (single_step): joint training, one task holding every class (the data manager builds a
  single task for single-step methods): the upper bound that incremental methods try to approach. It has no
  later task to replay a memory in, so `memory_size > 0` (and hence `apply_nme`) is refused.

Deviations from the original code: none in the algorithm. The memory exists iff `memory_size > 0` (the
original decided by whether `fixed_memory` was set at all); `incre_type: til` trains CE within each sample's
own task. The original's joint training crashed with SGD (it logged a non-existent `config.momentum`) and kept
a "best epoch" snapshot by reference, which did nothing; neither is copied. ECE is not reported.
"""
from methods import register_method
from methods.base import Method


@register_method("finetune_il")
class Finetune(Method):
    def training_step(self, x, y):
        return {"ce": self.ce(self.network(x)["logits"], y)}


@register_method("finetune_normal", method_type="single_step")
class JointTraining(Finetune):
    """Finetune on a single task with every class: nothing to replay."""

    replay = "none"
