"""Guards of a run: what must hold before a run starts (a memory that keeps something) and before a model is
saved or recorded (finite weights and predictions), each a one-line error when it does not."""
from __future__ import annotations

import torch

from trainer.engine.engine import NonFiniteLoss, first_non_finite
from utils.memory import ExemplarMemory
from utils.modes import eval_mode
from utils.precision import upcast
from utils.registry import UserError


def refuse_non_finite(scores: dict, when: str) -> None:
    """A classifier whose scores are NaN or +inf comes from a diverged model: it is never recorded (-inf is a
    legitimate mask)."""
    for key, value in scores.items():
        if value.is_floating_point() and bool((torch.isnan(value) | torch.isposinf(value)).any()):
            raise NonFiniteLoss(f"the model's '{key}' scores are non-finite {when}: it diverged; nothing of it was "
                                "saved or recorded (the last good checkpoint is kept); lower the learning rate "
                                "(lrate) and rerun")


def check_memory(cfg, data, method) -> str | None:
    """A fixed per-class memory must keep at least one exemplar per class; a fixed total smaller than the number
    of classes is allowed (as in the original) but empties classes in the last tasks: the warning to log."""
    if not isinstance(method.memory, ExemplarMemory):
        return None
    if cfg.fixed_memory and method.memory.quota(data.n_classes) < 1:
        raise UserError(f"fixed_memory: true with memory_size {cfg.memory_size} keeps memory_size // classes = 0 "
                        f"exemplars of each of the {data.n_classes} classes; set memory_per_class or a larger "
                        "memory_size")
    empty = next((t.index for t in data.tasks if cfg.memory_size // t.total == 0), None) \
        if not cfg.fixed_memory else None
    if empty is not None:
        return (f"memory_size {cfg.memory_size} is smaller than the {data.tasks[empty].total} classes seen by task "
                f"{empty}: from then on the memory keeps no exemplar of a class")
    return None


def check_finite(method, engine, data, position: dict) -> None:
    """Refuse to save or record a model whose parameters or buffers are not finite, or whose predictions on a few
    test images are NaN or +inf (weights blown up to 1e29 are finite but no longer a model): a diverged model
    never replaces the last good checkpoint. Cheap: once per save, on at most 8 images."""
    where = _where(position)
    name = first_non_finite(method)
    if name is not None:
        raise NonFiniteLoss(f"the model became non-finite ('{name}') {where}; nothing of it was saved or "
                            "recorded (the last good checkpoint is kept); lower the learning rate (lrate) and "
                            "rerun or resume")
    probe = data.dataset("test", data.indices("test", range(data.tasks[position["task"]].total))[:8])
    if len(probe):
        refuse_non_finite(_predict(method, engine, torch.stack([probe[i][0] for i in range(len(probe))])), where)


@torch.no_grad()
def _predict(method, engine, x: torch.Tensor) -> dict:
    """`method.predict` on one batch in eval mode (modes restored; no worker processes, no RNG drawn)."""
    with eval_mode(method), engine.autocast():
        return {k: upcast(v) for k, v in method.predict(engine.to_device(x)).items()}


def _where(position: dict) -> str:
    if position.get("done"):
        return f"after task {position['task']}"
    return f"in task {position['task']}, stage '{position['stage']}', epoch {position['epoch']}"
