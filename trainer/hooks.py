"""Hooks the engine calls after every epoch of every stage: mid-task checkpoints, per-epoch evaluation and
TensorBoard scalars. They are registered in that order (the checkpoint is taken after the evaluation, and
TensorBoard sees the evaluation's metric)."""
from __future__ import annotations

from typing import Callable

from utils.train_loop import EpochEnd, Hook


class EvalHook(Hook):
    """Every `every` epochs, the accuracy on the seen classes' test data as the metric `test_acc`."""

    def __init__(self, every: int, accuracy: Callable[[object], float]):
        self.every, self.accuracy = every, accuracy

    def after_epoch(self, end: EpochEnd) -> None:
        if self.every and end.epoch % self.every == 0:
            end.metrics["test_acc"] = self.accuracy(end.task)


class TensorBoardHook(Hook):
    """Loss means and metrics per epoch as `task<i>/<stage>/<name>`; `finish` adds the accuracy per task."""

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(folder)

    def after_epoch(self, end: EpochEnd) -> None:
        for name, value in {**end.metrics, **end.losses}.items():
            self.writer.add_scalar(f"task{end.task.index}/{end.stage}/{name}", value, end.epoch - 1)

    def finish(self, record: dict) -> None:
        for i, t in enumerate(record["tasks"]):
            self.writer.add_scalar("acc/seen_classes", t["acc"], i)
        self.writer.close()


class CheckpointHook(Hook):
    """Every `every` epochs, a checkpoint of the position inside the task (stage name, epochs done) with the
    optimiser and scheduler, through `save(position, optimizer=..., scheduler=...)`."""

    def __init__(self, every: int, save: Callable):
        self.every, self.save = every, save

    def after_epoch(self, end: EpochEnd) -> None:
        if self.every and end.epoch % self.every == 0:
            self.save({"task": end.task.index, "done": False, "stage": end.stage, "epoch": end.epoch},
                      optimizer=end.optimizer.state_dict(),
                      scheduler=end.scheduler.state_dict() if end.scheduler is not None else None)
