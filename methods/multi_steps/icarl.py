"""iCaRL: Incremental Classifier and Representation Learning (Rebuffi, Kolesnikov, Sperl, Lampert; CVPR 2017).

Idea: rehearsal with a small exemplar memory chosen by herding, plus distillation: while learning a new task the
network is trained on the new data and the exemplars, and its outputs on the old classes are kept close to those
of the frozen network from the previous task. Classification is by the nearest mean of exemplars (NME) in the
normalised feature space, which is robust to the bias of the linear head towards the newest classes.

    loss = CE(z[:, :seen], y) + KD_T(z[:, :known], z_old)          (KD in utils.losses.kd_loss)

Deviations:
- Paper: sigmoid binary cross-entropy for both terms. Here (as in the original code) softmax CE on the seen
  classes plus softened-softmax KD with temperature `T`, without a T^2 factor or weighting.
- NME is the classifier of record (`record = "nme"`, so `apply_nme: true` is required); the CNN head's accuracy
  is reported beside it. The original also reported both.
- The frozen previous network is copied at the start of a task (not the end of the last one) so that a
  checkpoint can be restored by replaying `before_task`; its BN statistics stay frozen during training.
- `incre_type: til` trains CE within the task (the original is cil only).

Against PyCIL's iCaRL (docs/icarl_vs_pycil.md, benchmarks/pycil/): the network, loss, herding, class
means and evaluation agree piece by piece on the same inputs, and so do the last NME accuracies over many seeds
once both draw the initial network from the seed (PyCIL's trainer seeds torch with 1 for every seed).
"""
from __future__ import annotations

from dataclasses import dataclass

from methods import register_method
from methods.base import Method
from utils.config import key
from utils.losses import kd_loss
from utils.registry import UserError


@dataclass(frozen=True)
class ICaRLConfig:
    T: float = key(2.0, "distillation temperature", range="(0, inf)")


@register_method("icarl", config=ICaRLConfig)
class ICaRL(Method):
    record = "nme"
    replay = "required"
    distills = True

    def __init__(self, cfg, data):
        if not cfg.apply_nme:
            raise UserError("icarl classifies by the nearest mean of exemplars: set apply_nme: true (and memory_size)")
        super().__init__(cfg, data)

    def training_step(self, x, y):
        logits, old_logits = self.logits_and_old(x)
        losses = {"ce": self.ce(logits, y)}
        if old_logits is not None:
            losses["kd"] = kd_loss(logits[:, : self.task.known], old_logits, self.cfg.T)
        return losses
