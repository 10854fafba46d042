"""LwF: Learning without Forgetting (Li, Hoiem; ECCV 2016, TPAMI 2017), in its class-incremental form.

Idea: no stored samples at all. While the network learns a new task from the new data only, its outputs on the
old classes for that same data are kept close to those of the network as it was before the task (a frozen copy):
the new data stands in for the old, and the old network's soft outputs on it are the targets that preserve the
old knowledge (knowledge distillation, Hinton et al. 2015).

    loss = CE(z[:, known:total], y - known) + lwf_lambda * KD_T(z[:, :known], z_old)

z the network's logits, z_old the frozen previous network's on the same (augmented) batch, KD_T the
temperature-softened distillation of utils.losses.kd_loss (no T^2 factor), T = 2 and lwf_lambda = 1 the paper's
(its lambda_o; PyCIL's LwF uses lamda 3). In the first task known = 0 and the loss is plain CE. Prediction:
argmax over every seen class of the single growing head (`Method.predict`).

Deviations from the paper, and why:
- Class-incremental, one head: the paper gives each task its own head and tells the test sample's task at
  inference (task-incremental). Here, as in PyCIL's LwF, one linear head grows by the new classes
  (backbone/incremental_net.py) and a sample is classified among all seen classes. The CE covers the new classes
  only (the new task's head in the paper; PyCIL slices the logits the same way), so the new data does not push the
  old logits down directly; only the KD term speaks for the old classes.
- No warm-up: the paper first trains the new head alone with the rest frozen, then everything jointly; here the
  whole network trains jointly from the start of the task (as PyCIL). The new rows start as the head's usual
  initialisation (backbone/incremental_net.py).
- The old network's outputs are computed on each augmented batch as it is drawn (the paper records them once on
  the new data before training), so teacher and student always see the same image.
- `incre_type: til`: the CE is the same (the batch holds only the current task's classes, which are each sample's
  own task); KD distils all old classes jointly rather than one softmax per old task's head as the paper's
  multi-head network would; prediction is within each sample's task (the evaluation's til masking).
- No memory: `replay = "none"` (memory_size > 0 is refused), hence no NME (apply_nme: true is refused).
"""
from __future__ import annotations

from dataclasses import dataclass

from methods import register_method
from methods.base import Method
from utils.config import key
from utils.losses import bounded_ce, kd_loss


@dataclass(frozen=True)
class LwFConfig:
    T: float = key(2.0, "distillation temperature (the paper's T = 2)", range="(0, inf)")
    lwf_lambda: float = key(1.0, "weight of the distillation term (the paper's lambda_o = 1; PyCIL uses 3)",
                            range="[0, inf)")


@register_method("lwf", config=LwFConfig)
class LwF(Method):
    replay = "none"
    distills = True

    def training_step(self, x, y):
        logits, old_logits = self.logits_and_old(x)
        known, total = self.task.known, self.task.total
        losses = {"ce": bounded_ce(logits, y, known, total)}  # the new classes only, targets y - known
        if old_logits is not None:
            losses["kd"] = self.cfg.lwf_lambda * kd_loss(logits[:, :known], old_logits, self.cfg.T)
        return losses
