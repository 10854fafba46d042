"""Re-testing a finished run: reload the model saved after each task and evaluate it again, into
results_retest.json beside results.json."""
from __future__ import annotations

import json
import logging
import os

import torch

from trainer.evaluation import task_entry
from trainer.resume import load_method
from trainer.results import ResultsFile, add_task
from trainer.task_loop import build
from utils import checkpoint
from utils.flops import InferenceCost
from utils.logging import close_logging, setup_logging

log = logging.getLogger("cl")


def retest(cfg, device: torch.device, run_dir: str) -> dict:
    """Tasks without a saved model (save_models: false keeps only the last) keep their recorded numbers, marked
    `retested: false`."""
    setup_logging(os.path.join(run_dir, "run.log"))
    try:
        log.info(f"re-testing the finished run in {run_dir} on {device}")
        results = ResultsFile(run_dir, cfg, name="results_retest")
        with open(os.path.join(run_dir, "results.json")) as f:
            saved_runs = {r["seed"]: r for r in json.load(f)["runs"]}
        for seed in cfg.seed:
            data, method, engine = build(cfg, seed, device)
            cost = InferenceCost()
            record = {"seed": seed, "class_order": data.class_order, "tasks": []}
            for task in data.tasks:
                method.task = task
                method.before_task(task)
                path = checkpoint.task_path(run_dir, seed, task.index)
                if not os.path.isfile(path) and task.index == len(data.tasks) - 1:
                    path = checkpoint.latest_path(run_dir, seed)
                if os.path.isfile(path):
                    load_method(method, checkpoint.load(path), device)
                    entry = task_entry(method, engine, data, task, cfg, run_dir, seed, cost)
                else:
                    entry = dict(saved_runs[seed]["tasks"][task.index], retested=False)
                add_task(record, entry)
            record["complete"] = True
            results.runs.append(record)
        return results.finish()
    finally:
        close_logging()
