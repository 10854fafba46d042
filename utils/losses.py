"""Loss functions shared by the distillation and replay methods; each states its formula.

Notation: z are logits (B, C), y integer targets (B,), T a temperature, softmax and log_softmax over classes.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def kd_loss(logits: torch.Tensor, old_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015, as used by iCaRL/WA/BiC in the original code):

        KD(z, z_old) = -(1/B) sum_i sum_c softmax(z_old_i / T)_c * log_softmax(z_i / T)_c

    `logits` are the current network's outputs on the old classes (B, C_old), `old_logits` the frozen previous
    network's (B, C_old). No T^2 factor (the original's scale; the weighting is left to the caller)."""
    targets = F.softmax(old_logits.float() / T, dim=1)
    return -(targets * F.log_softmax(logits.float() / T, dim=1)).sum(1).mean()


def task_ce(logits: torch.Tensor, y: torch.Tensor, class_bounds: torch.Tensor) -> torch.Tensor:
    """Cross-entropy within each sample's own task (task-incremental CE): with [lo_i, hi_i) = class_bounds[y_i]
    the class range of the task of y_i,

        loss = mean_i ( -z_{i,y_i} + log sum_{lo_i <= c < hi_i} exp(z_{i,c}) )

    `class_bounds` is (C, 2): the [known, total) bounds of every class's task."""
    lo, hi = class_bounds[y].unbind(1)
    cols = torch.arange(logits.shape[1], device=logits.device)
    outside = (cols < lo[:, None]) | (cols >= hi[:, None])
    return F.cross_entropy(logits.float().masked_fill(outside, float("-inf")), y)


def class_task_bounds(tasks) -> torch.Tensor:
    """(C, 2) long tensor: row c holds [known, total) of the task that adds class c (input of `task_ce`)."""
    return torch.as_tensor([[t.known, t.total] for t in tasks for _ in range(t.total - t.known)], dtype=torch.long)


def weighted_kd_losses(ce: torch.Tensor, logits: torch.Tensor, old_logits: torch.Tensor | None,
                       T: float) -> dict[str, torch.Tensor]:
    """CE and KD weighted by the share of old classes (WA, BiC), with C_old = old_logits.shape[1] and C_seen =
    logits.shape[1] (`logits` restricted to the seen classes):

        lam = C_old / C_seen;   {"ce": (1 - lam) * ce, "kd": lam * KD_T(z[:, :C_old], z_old)}

    Just {"ce": ce} before there is an old network (`old_logits` None)."""
    if old_logits is None:
        return {"ce": ce}
    lam = old_logits.shape[1] / logits.shape[1]
    return {"ce": (1 - lam) * ce, "kd": lam * kd_loss(logits[:, : old_logits.shape[1]], old_logits, T)}
