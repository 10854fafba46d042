"""The optimiser and learning-rate schedule of a stage (its `OptimConfig`), and the check of an optimiser state
saved inside a stage before a resume loads it."""
from __future__ import annotations

import torch

from utils.types import OptimConfig


def build_optimizer(params, opt: OptimConfig) -> torch.optim.Optimizer:
    if opt.opt_type == "sgd":
        return torch.optim.SGD(params, lr=opt.lrate, momentum=opt.opt_mom, nesterov=opt.nesterov and opt.opt_mom > 0,
                               weight_decay=opt.weight_decay)
    optimizer = torch.optim.Adam if opt.opt_type == "adam" else torch.optim.AdamW
    return optimizer(params, lr=opt.lrate, weight_decay=opt.weight_decay)


def build_scheduler(optimizer, opt: OptimConfig):
    """Stepped once per epoch; None: a constant rate."""
    if opt.scheduler == "multi_step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(opt.milestones), gamma=opt.lrate_decay)
    if opt.scheduler == "cos":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(opt.epochs, 1))
    return None


def optimizer_state_problem(params: list[torch.Tensor], state) -> str | None:
    """What keeps a saved optimiser state from fitting `params` (None: nothing): it must be well formed, cover at
    most as many parameters, and every per-parameter tensor (momentum, Adam moments) must have the shape of one of
    them."""
    groups, per_param = (state.get("param_groups"), state.get("state")) if isinstance(state, dict) else (None, None)
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
            and isinstance(per_param, dict)):
        return "holds a malformed optimizer state"
    if sum(len(g["params"]) for g in groups) > len(params):
        return "holds an optimizer state for more parameters than the method has"
    shapes = {tuple(p.shape) for p in params}
    for index, entry in per_param.items():
        if not isinstance(entry, dict):
            return f"holds a malformed optimizer state for parameter {index}"
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) not in shapes:
                return (f"holds an optimizer state ('{name}' of parameter {index}) that fits none of the method's "
                        "parameters")
    return None
