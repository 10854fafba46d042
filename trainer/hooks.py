"""The hooks of a run (the protocol: trainer/engine/hooks.py), in the order they are called:

- `EvalHook`: every `test_epoch` epochs, the accuracy on the seen classes' test data, as the metric `test_acc`;
- `TensorBoardHook`: loss means and metrics per epoch, the accuracy on the seen classes per task (and, with
  `val_split`, the validation accuracy);
- `WandbHook`: the same and more (learning rate, each task's results.json numbers and accuracy-matrix row, the
  seed's final metrics) as one Weights & Biases run per seed, offline under the run folder unless asked otherwise;
- `CheckpointHook`: a checkpoint every `checkpoint_every` epochs inside a task and one after every task;
- `ResultsHook`: results.json after every task and seed, and the prediction records;
- `LogHook`: the run log's lines (the seed's start, every epoch, every task, the seed's end).

Each hook owns its state; a seed's run binds them in `before_run`. The checkpoint is taken after the evaluation,
TensorBoard and W&B see the evaluation's metric, and the log line of an epoch shows every metric.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets

import numpy as np

from trainer import checkpoint
from trainer.engine.engine import format_losses
from trainer.engine.hooks import EpochEnd, Hook
from trainer.evaluation import evaluate
from trainer.guards import check_finite
from utils import distributed
from utils.registry import UserError

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


def import_wandb():
    """The wandb module: an optional dependency, imported only when a run logs to W&B."""
    try:
        import wandb
    except ImportError:
        raise UserError("logger_type wandb needs the wandb package: pip install wandb") from None
    return wandb


def require_logger(cfg) -> None:
    """The package of the configured logger, checked before anything is written: a missing one is a one-line
    error naming it."""
    if cfg.logger_type == "wandb" and distributed.is_main():
        import_wandb()


def wandb_mode(cfg) -> str:
    """`wandb_mode`, unless WANDB_MODE in the environment asks for less (offline, disabled): the network is used
    only when both allow it."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    return env if env in ("offline", "dryrun", "disabled") else cfg.wandb_mode


class WandbHook(Hook):
    """Per seed, one Weights & Biases run `seed<S>` in the group named after the run folder (a run's seeds sit
    together), its config the resolved config plus the seed. Per epoch: the loss means and metrics as
    `<stage>/<name>` and the learning rate as `<stage>/lr`, against `epoch` (the seed's epochs so far, counted
    across resumes), with the task index `task`; per task: `acc`, `old_acc`, `new_acc`, `nme_acc`, `val_acc`,
    `gflops`, `params` and the accuracy on each task so far as `acc_matrix/task_<j>`, against `task`; after the
    seed: last_acc, avg_incremental_acc, forgetting and bwt in the summary, and the accuracy matrix as the table
    `accuracy_matrix`.

    W&B writes its files under `<run folder>/wandb/`. `wandb_seed<S>.json` in the run folder keeps the W&B run's
    id and the epoch count (rewritten after every epoch), so a resumed run continues the same W&B run and its
    epoch axis. A W&B failure costs the logging, never the training: it becomes one warning, and the seed goes on
    without W&B. Only rank 0 logs."""

    def __init__(self, cfg, run_dir: str):
        self.wandb = import_wandb()  # before the seed trains: a missing package is a one-line error
        self.cfg, self.run_dir, self.wb, self.state, self.state_path = cfg, run_dir, None, {}, ""
        self.stages: set[str] = set()  # the stages whose metrics are declared against `epoch`

    def before_run(self, run) -> None:
        self.state_path = os.path.join(self.run_dir, f"wandb_seed{run.seed}.json")
        try:
            if os.path.lexists(self.state_path):  # an earlier part of this seed: continue its W&B run
                self.state = self._read_state()
            else:
                self.state = {"id": secrets.token_hex(8), "epoch": 0}
                self._save_state()
            mode = wandb_mode(self.cfg)
            settings = self.wandb.Settings(silent=True, console="off")
            if mode != "online":  # no system metrics or metadata (they probe cloud metadata servers), and W&B's
                # process-wide settings offline too: else its own usage telemetry asks the W&B server
                settings = self.wandb.Settings(mode=mode, silent=True, console="off", x_disable_stats=True,
                                               x_disable_meta=True)
                self.wandb.setup(settings=settings)
            # finish_previous: closes the W&B run that a seed ended by an error (in this process) left open
            self.wb = self.wandb.init(
                project=self.cfg.wandb_project, group=os.path.basename(os.path.normpath(self.run_dir)),
                name=f"seed{run.seed}", id=self.state["id"], resume="allow", dir=self.run_dir, mode=mode,
                config={**self.cfg.to_dict(), "seed": run.seed}, reinit="finish_previous", settings=settings)
            for axis in ("epoch", "task"):
                self.wb.define_metric(axis)
            for name in (*TASK_KEYS, "acc_matrix/*"):
                self.wb.define_metric(name, step_metric="task")
        except Exception as err:
            self._stop(err)

    def after_epoch(self, end: EpochEnd) -> None:
        if self.wb is None:
            return
        try:
            if end.stage not in self.stages:
                self.wb.define_metric(f"{end.stage}/*", step_metric="epoch")
                self.stages.add(end.stage)
            self.state["epoch"] += 1
            self._save_state()  # first: a kill between the two leaves a gap in the epoch axis, never a repeat
            values = {**end.losses, **end.metrics, "lr": end.optimizer.param_groups[0]["lr"]}
            self.wb.log({"epoch": self.state["epoch"], "task": end.task.index,
                         **{f"{end.stage}/{k}": v for k, v in values.items()}})
        except Exception as err:
            self._stop(err)

    def after_task(self, run, entry: dict) -> None:
        if self.wb is None:
            return
        try:
            row = {k: entry[k] for k in TASK_KEYS if entry.get(k) is not None}
            row.update({f"acc_matrix/task_{j}": v for j, v in enumerate(entry["acc_per_task"]) if v is not None})
            self.wb.log({"task": entry["task"], **row})
        except Exception as err:
            self._stop(err)

    def after_run(self, run) -> None:
        if self.wb is None:
            return
        try:
            record = run.record
            for k in ("last_acc", "avg_incremental_acc", "forgetting", "bwt"):
                if record.get(k) is not None:
                    self.wb.summary[k] = record[k]
            matrix = record["acc_matrix"]
            table = self.wandb.Table(columns=["after_task", *(f"task_{j}" for j in range(len(matrix)))],
                                     data=[[i, *row] for i, row in enumerate(matrix)])
            self.wb.log({"accuracy_matrix": table})
            wb, self.wb = self.wb, None
            wb.finish()
        except Exception as err:
            self._stop(err)

    def _read_state(self) -> dict:
        """The W&B run id and epoch count an earlier part of this seed saved, read as a file of a run folder that
        others may have touched: a regular file (a FIFO would block, a link point elsewhere) of at most 4 KiB,
        holding the 16 hex digits this hook draws (the id names W&B's folder under the run folder) and a count."""
        fd = checkpoint.open_regular(self.state_path, os.O_RDONLY, "W&B run id")
        with os.fdopen(fd, "rb") as f:
            raw = f.read(4097)
        try:
            state = json.loads(raw) if len(raw) <= 4096 else None
        except ValueError:
            state = None
        if not (isinstance(state, dict) and isinstance(state.get("id"), str)
                and re.fullmatch(r"[0-9a-f]{16}", state["id"]) and type(state.get("epoch")) is int
                and state["epoch"] >= 0):
            raise UserError(f"'{self.state_path}' is not a W&B run id this run saved; remove it to start a new "
                            "W&B run for this seed")
        return state

    def _save_state(self) -> None:
        checkpoint.atomic_write(self.state_path, lambda f: json.dump(self.state, f), "W&B run id", binary=False)

    def _stop(self, err: Exception) -> None:
        """Go on without W&B after `err` (one warning), closing the W&B run if one is open."""
        log.warning(f"W&B logging stopped for this seed: {type(err).__name__}: {str(err).strip()[:300]}")
        wb, self.wb = self.wb, None
        if wb is not None:
            self._finish(wb, exit_code=1)

    @staticmethod
    def _finish(wb, exit_code: int) -> None:
        try:
            wb.finish(exit_code=exit_code)
        except Exception as err:  # a W&B run that cannot even be closed costs nothing else
            log.warning(f"W&B run not closed cleanly: {type(err).__name__}: {str(err).strip()[:300]}")


#: The numbers of a task's results.json entry that W&B plots against the task index.
TASK_KEYS = ("acc", "old_acc", "new_acc", "nme_acc", "val_acc", "gflops", "params")


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
    if cfg.logger_type == "wandb" and distributed.is_main():
        hooks.append(WandbHook(cfg, run_dir))
    return [*hooks, CheckpointHook(cfg, run_dir), ResultsHook(results), LogHook()]
