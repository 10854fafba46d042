"""WA: Weight Aligning (Zhao, Xiao, Gan, Zhang, Xia; "Maintaining Discrimination and Fairness in Class
Incremental Learning", CVPR 2020).

Idea: with few exemplars of the old classes, the last layer becomes biased towards the new classes, visibly as
larger weight norms of the new-class rows. Train with rehearsal and distillation weighted by the share of old
classes, then, after the task, rescale the new-class rows so that their mean norm equals the old rows':

    loss = (1 - lam) * CE(z[:, :seen], y) + lam * KD_T(z[:, :known], z_old),      lam = known / seen
    gamma = mean_{c old} ||W_c|| / mean_{c new} ||W_c||,      W_new <- gamma * W_new,  b_new <- gamma * b_new

With `weight_clipping` (the paper's choice, on by default) the head's weights are clipped to be non-negative
during training, so that the norms reflect how strongly each class responds to the (non-negative) ReLU features.

Deviations:
- The original code scales only the weight rows and keeps the new-class biases; we scale both, so the corrected
  new-class logits are exactly gamma times the trained ones, as in the paper's corrected output gamma * o_new(x)
  (the paper's head has no bias). Alignment uses the norms of the weight rows only, as in both.
- The original has no clipping. The paper clips after every optimiser step; we clamp the head's weights at the
  start of every training step and once more before aligning, which gives the same weights (the loop offers
  no after-step hook).
- The original cannot start from its own yaml (the key `T` is not declared); here `T` is a declared key.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from methods import register_method
from methods.base import Method
from utils.config import key
from utils.losses import weighted_kd_losses

log = logging.getLogger("cl")


def align_weights(weight: torch.Tensor, bias: torch.Tensor | None, known: int) -> float:
    """Rescale rows [known:] of a linear head in place so that their mean L2 norm equals that of rows [:known];
    returns gamma."""
    norms = torch.linalg.vector_norm(weight, dim=1)
    gamma = float(norms[:known].mean() / norms[known:].mean())
    weight[known:] *= gamma
    if bias is not None:
        bias[known:] *= gamma
    return gamma


@dataclass(frozen=True)
class WAConfig:
    T: float = key(2.0, "distillation temperature", range="(0, inf)")
    weight_clipping: bool = key(True, "clip the head's weights to be non-negative during training (paper)")


@register_method("wa", config=WAConfig)
class WA(Method):
    distills = True

    def training_step(self, x, y):
        self._clip()
        logits, old_logits = self.logits_and_old(x)
        logits = logits[:, : self.task.total]
        return weighted_kd_losses(self.ce(logits, y), logits, old_logits, self.cfg.T)

    def after_task(self, task, infer):
        self._clip()
        if not task.is_first:
            with torch.no_grad():
                fc = self.network.fc
                gamma = align_weights(fc.weight, fc.bias, task.known)
            log.info(f"task {task.index}: weight aligning, new-class rows scaled by {gamma:.4f}")

    def _clip(self):
        if self.cfg.weight_clipping:
            with torch.no_grad():
                self.network.fc.weight.clamp_(min=0)
