"""Joint training: one task holding every class, the upper bound of class-incremental learning.

Idea: the run is a single task with all classes (the DataManager builds one task for single-step methods),
trained with cross-entropy. Its accuracy is what incremental methods try to approach.

Deviations from the original code: the original crashed with SGD (it logged a non-existent `config.momentum`)
and kept a "best epoch" snapshot by reference, which did nothing; neither is copied. ECE is not reported.
"""
from methods import register_method
from methods.base import Method


@register_method("finetune_normal")
class FinetuneNormal(Method):
    def training_step(self, x, y):
        return {"ce": self.seen_logits_ce(self.network(x)["logits"], y)}
