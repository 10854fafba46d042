"""The hooks of a run (the protocol: trainer/engine/hooks.py), in the order they are called:

- `EvalHook`: every `test_epoch` epochs, the accuracy on the seen classes' test data, as the metric `test_acc`;
- `TensorBoardHook`: loss means and metrics per epoch, the accuracy on the seen classes per task (and, with
  `val_split`, the validation accuracy);
- `CheckpointHook`: a checkpoint every `checkpoint_every` epochs inside a task and one after every task;
- `ResultsHook`: results.json after every task and seed, and the prediction records;
- `LogHook`: the run log's lines (the seed's start, every epoch, every task, the seed's end).

Each hook owns its state; a seed's run binds them in `before_run`. The checkpoint is taken after the evaluation,
TensorBoard sees the evaluation's metric, and the log line of an epoch shows every metric.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from trainer import checkpoint
from trainer.engine.engine import format_losses
from trainer.engine.hooks import EpochEnd, Hook
from trainer.evaluation import evaluate
from trainer.guards import check_finite
from utils import distributed

log = logging.getLogger("cl")


class EvalHook(Hook):
    """Every `every` epochs (0: never), the accuracy on the seen classes' test data as the metric `test_acc`."""

    def __init__(self, every: int):
        self.every, self.run = every, None

    def before_run(self, run) -> None:
        self.run = run

    def after_epoch(self, end: EpochEnd) -> None:
        if self.every and end.epoch % self.every == 0:
            run = self.run  # mid-task, a classifier without means for the new classes yet reports the CNN's
            result = evaluate(run.method, run.engine, run.data, end.task, run.cfg)
            end.metrics["test_acc"] = result.get(run.method.record, result["cnn"])["acc"]


class TensorBoardHook(Hook):
    """Per seed, `<run folder>/tensorboard/seed<S>`: loss means and metrics per epoch as
    `task<i>/<stage>/<name>`, and after the run the accuracy on the seen classes after each task (`acc/seen_classes`)
    and, where the run holds out a validation set, the validation accuracy (`val_acc/seen_classes`)."""

    def __init__(self, run_dir: str):
        self.run_dir, self.writer = run_dir, None

    def before_run(self, run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard", f"seed{run.seed}"))

    def after_epoch(self, end: EpochEnd) -> None:
        for name, value in {**end.metrics, **end.losses}.items():
            self.writer.add_scalar(f"task{end.task.index}/{end.stage}/{name}", value, end.epoch - 1)

    def after_run(self, run) -> None:
        for i, t in enumerate(run.record["tasks"]):
            self.writer.add_scalar("acc/seen_classes", t["acc"], i)
            if t.get("val_acc") is not None:
                self.writer.add_scalar("val_acc/seen_classes", t["val_acc"], i)
        self.writer.close()


class CheckpointHook(Hook):
    """`seed<S>_latest.pt` every `every` epochs inside a task (0: never; with the optimiser and scheduler) and after
    every task, plus `seed<S>_task<T>.pt` after each task with `save_models`. A model that is not finite is never
    saved (`check_finite`), so the last good checkpoint stays. Only rank 0 writes."""

    def __init__(self, cfg, run_dir: str):
        self.cfg, self.run_dir, self.run = cfg, run_dir, None

    def before_run(self, run) -> None:
        self.run = run

    def after_epoch(self, end: EpochEnd) -> None:
        if self.cfg.checkpoint_every and end.epoch % self.cfg.checkpoint_every == 0:
            self.save({"task": end.task.index, "done": False, "stage": end.stage, "epoch": end.epoch},
                      optimizer=end.optimizer.state_dict(),
                      scheduler=end.scheduler.state_dict() if end.scheduler is not None else None,
                      **({"scaler": end.scaler.state_dict()} if end.scaler is not None else {}))

    def after_task(self, run, entry: dict) -> None:
        self.save({"task": entry["task"], "done": True})

    def save(self, position: dict, **extra) -> None:
        """Write the checkpoint of `position` (with `extra` optimiser and scheduler state), once the model is
        checked to be finite (on every rank: each holds the same state)."""
        run = self.run
        check_finite(run.method, run.engine, run.data, position)
        if not distributed.is_main():  # rank 0 writes
            return
        state = checkpoint.content(self.cfg, run.seed, position, run.method, run.record, **extra)
        checkpoint.save(checkpoint.latest_path(self.run_dir, run.seed), state)
        if position["done"] and self.cfg.save_models:
            checkpoint.save(checkpoint.task_path(self.run_dir, run.seed, position["task"]), state)


class ResultsHook(Hook):
    """results.json (`results`, a trainer.results.ResultsFile) with the seed's record so far after every task, and
    with the finished seed after the run; with `save_pred_record`, each task's test targets and predictions in
    `pred_record_seed<S>_task<T>.npz`. Only rank 0 writes."""

    def __init__(self, results):
        self.results = results

    def after_task(self, run, entry: dict) -> None:
        if run.predictions is not None and distributed.is_main():
            path = os.path.join(self.results.run_dir, f"pred_record_seed{run.seed}_task{entry['task']}.npz")
            checkpoint.atomic_write(path, lambda f: np.savez(f, **run.predictions), "prediction record")
        self.results.write(current=run.record)

    def after_run(self, run) -> None:
        self.results.runs.append(run.record)
        self.results.write()


class LogHook(Hook):
    """The run log: the seed's tasks and class order, the fast paths in use, a line per epoch (losses, learning
    rate, time, metrics), per task (`log_task`) and the seed's result."""

    def before_run(self, run) -> None:
        log.info(f"seed {run.seed}: {len(run.data.tasks)} tasks {[t.total - t.known for t in run.data.tasks]}, "
                 f"class order {run.data.class_order}" + (f"; resuming at task {run.first}" if run.resumed else ""))
        for warning in (run.memory_warning, run.note):
            if warning:
                log.warning(warning)
        log.info(f"fast paths: {run.engine.describe()}")

    def after_epoch(self, end: EpochEnd) -> None:
        log.info(f"task {end.task.index} {end.stage} epoch {end.epoch}/{end.epochs} {format_losses(end.losses)} "
                 f"lr {end.optimizer.param_groups[0]['lr']:.4g} ({end.seconds:.1f} s)"
                 + "".join(f" {k} {v:.2f}" for k, v in end.metrics.items()))

    def after_task(self, run, entry: dict) -> None:
        log_task(entry, run.cfg.eval_metric)

    def after_run(self, run) -> None:
        r = run.record
        log.info(f"seed {run.seed}: last {run.cfg.eval_metric} {r['last_acc']:.2f}, average incremental "
                 f"{r['avg_incremental_acc']:.2f}, forgetting {r['forgetting']:.2f}, BWT {r['bwt']:.2f}")


def log_task(entry: dict, metric: str) -> None:
    """The log line of a task's results.json entry."""
    def pct(v):
        return "-" if v is None or np.isnan(v) else f"{v:.2f}"

    log.info(f"task {entry['task']}: {metric} {entry['acc']:.2f} (per task "
             f"{', '.join(f'{a:.1f}' for a in entry['acc_per_task'])}; old {pct(entry['old_acc'])} new "
             f"{pct(entry['new_acc'])})" + (f" nme {entry['nme_acc']:.2f}" if entry["nme_acc"] is not None else "")
             + f" | {entry['gflops']:.4f} GFLOPs, {entry['params'] / 1e6:.3f} M params")


def run_hooks(cfg, run_dir: str, results) -> list[Hook]:
    """The hooks of a seed's run, in the order they are called."""
    hooks: list[Hook] = [EvalHook(cfg.test_epoch)]
    if cfg.logger_type == "tensorboard" and distributed.is_main():
        hooks.append(TensorBoardHook(run_dir))
    return [*hooks, CheckpointHook(cfg, run_dir), ResultsHook(results), LogHook()]
