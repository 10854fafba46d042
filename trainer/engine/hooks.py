"""What a seed's run calls besides the loops: a `Hook` overrides any of four methods, each called in the order the
hooks were given (so a hook sees what earlier hooks added to an epoch's metrics).

    before_run(run)           once, before the seed's first task (or the task it resumes)
    after_epoch(end)          after every epoch of every stage, by the engine (`EpochEnd`)
    after_task(run, entry)    after a task is trained, evaluated and recorded (`entry`: its results.json entry)
    after_run(run)            once, after the seed's last task

`run` is the seed's `trainer.task_loop.SeedRun` (its method, data, engine and record). The hooks of a run are in
trainer/hooks.py: per-epoch evaluation, TensorBoard, checkpoints, results.json and the log.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from utils.types import Task


@dataclass
class EpochEnd:
    """What the hooks see after every epoch of a stage."""

    task: Task
    stage: str
    epoch: int  # epochs done in this stage, 1-based
    epochs: int
    losses: dict[str, float]
    optimizer: torch.optim.Optimizer
    scheduler: object
    seconds: float = 0.0  # the epoch's wall time
    scaler: object = None  # the gradient scaler of float16 autocast, else None
    metrics: dict[str, float] = field(default_factory=dict)  # hooks add e.g. test_acc here


class Hook:
    def before_run(self, run) -> None:
        pass

    def after_epoch(self, end: EpochEnd) -> None:
        pass

    def after_task(self, run, entry: dict) -> None:
        pass

    def after_run(self, run) -> None:
        pass
