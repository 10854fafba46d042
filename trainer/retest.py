"""Re-testing a finished run: reload the model saved after each task and evaluate it again, into
results_retest.json beside results.json.

Every checkpoint is checked before it is used (trainer/resume.py: written by this run's config for this seed at
the end of that task, and its state fits the method). Each task entry says whether it was re-tested
(`retested: true`) or keeps the recorded numbers (`retested: false`: no checkpoint of it, e.g. with
`save_models: false`); each seed's record lists `retested_tasks`. When no task of any seed can be re-tested, the
command fails instead of printing the old numbers."""
from __future__ import annotations

import logging
import os

import torch

from trainer.evaluation import task_entry
from trainer.resume import load_method, read_checkpoint, read_results
from trainer.results import ResultsFile, RunLock, add_task
from trainer.task_loop import build
from utils import checkpoint, distributed
from utils.flops import InferenceCost
from utils.logging import close_logging, setup_logging
from utils.registry import UserError

log = logging.getLogger("cl")


def retest(cfg, device: torch.device, run_dir: str) -> dict:
    lock = RunLock(run_dir) if distributed.is_main() else None
    try:
        saved = read_results(run_dir)
        saved_runs = {r["seed"]: r for r in saved["runs"]}
        found = {seed: _checkpoints(run_dir, seed, saved_runs[seed]) for seed in cfg.seed}
        if not any(p for paths in found.values() for p in paths.values()):
            raise UserError(f"nothing to re-test in {run_dir}: no checkpoint of any task is left in "
                            f"{checkpoint.folder(run_dir)}")
        setup_logging(os.path.join(run_dir, "run.log"), quiet=not distributed.is_main())
        try:
            log.info(f"re-testing the finished run in {run_dir} on {device}")
            results = ResultsFile(run_dir, cfg, name="results_retest")
            for seed in cfg.seed:
                results.runs.append(_retest_seed(cfg, seed, device, run_dir, saved_runs[seed], found[seed]))
            return results.finish()
        finally:
            close_logging()
    finally:
        if lock is not None:
            lock.release()


def _checkpoints(run_dir: str, seed: int, saved: dict) -> dict[int, str | None]:
    """Task index -> the checkpoint saved after it (None: none), for every task results.json recorded. The
    latest checkpoint stands for the last task when there is no task checkpoint of it (save_models: false)."""
    n = len(saved["tasks"])
    paths = {t: checkpoint.task_path(run_dir, seed, t) for t in range(n)}
    if n and not os.path.isfile(paths[n - 1]):
        paths[n - 1] = checkpoint.latest_path(run_dir, seed)
    return {t: p if os.path.isfile(p) else None for t, p in paths.items()}


def _retest_seed(cfg, seed: int, device, run_dir: str, saved: dict, paths: dict[int, str | None]) -> dict:
    data, method, engine = build(cfg, seed, device)
    cost = InferenceCost()
    if len(saved["tasks"]) != len(data.tasks) or saved.get("class_order") != data.class_order:
        raise UserError(f"results.json of {run_dir} does not match its config.yaml for seed {seed} (tasks or class "
                        "order differ); it was not written by this run")
    record = {"seed": seed, "class_order": data.class_order, "tasks": []}
    retested = []
    for task in data.tasks:
        method.task = task
        method.before_task(task)
        path = paths[task.index]
        if path is not None:
            state = read_checkpoint(path, cfg, run_dir, seed, len(data.tasks), task=task.index)
            load_method(method, state, device, path, task)
            entry = dict(task_entry(method, engine, data, task, cfg, run_dir, seed, cost), retested=True)
            retested.append(task.index)
        else:
            entry = dict(saved["tasks"][task.index], retested=False)
        add_task(record, entry)
    record["complete"] = True
    record["retested_tasks"] = retested
    missing = [t.index for t in data.tasks if t.index not in retested]
    log.info(f"seed {seed}: re-tested task(s) {', '.join(map(str, retested)) or 'none'}"
             + (f"; not re-tested (no checkpoint, recorded numbers kept): {', '.join(map(str, missing))}"
                if missing else ""))
    return record
