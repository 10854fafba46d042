"""THE task loop: for each task, before_task -> the task's stages -> after_task -> evaluation, then the metrics.

One `run_seed` per seed, with nothing shared between seeds (fresh data manager, method, engine, RNG and hooks).
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from datasets.scenario import DataManager
from methods import METHODS, build_method
from trainer.evaluation import evaluate, task_entry
from trainer.hooks import CheckpointHook, EvalHook, TensorBoardHook
from trainer.resume import read_checkpoint, restore
from trainer.results import ResultsFile, add_task, run_folder, write_config
from utils import checkpoint
from utils.checkpoint import rng_state
from utils.logging import close_logging, setup_logging
from utils.seed import set_seed
from utils.train_loop import Engine

log = logging.getLogger("cl")


def build(cfg, seed: int, device: torch.device):
    """The data manager, method and engine of one seed, with the RNGs seeded."""
    set_seed(seed)
    single = METHODS.meta(cfg.method)["method_type"] in ("single_step", "pretrain")
    data = DataManager(cfg, seed, single_task=single)
    return data, build_method(cfg, data), Engine(device, cfg.num_workers, cfg.amp)


def run_seed(cfg, seed: int, device: torch.device, run_dir: str, on_task=None, resume: dict | None = None) -> dict:
    """Train one seed task by task (continuing from the checkpoint `resume` if given); returns its record."""
    data, method, engine = build(cfg, seed, device)
    method.run_dir = run_dir  # where a method may write files of its own (contrastive_pretrain: the backbone)
    record = {"seed": seed, "class_order": data.class_order, "tasks": []}
    first, position = 0, None
    if resume is not None:
        record = resume["record"]
        first, position = restore(method, data, resume, device)
    os.makedirs(checkpoint.folder(run_dir), exist_ok=True)

    def save(where: dict, **extra) -> None:
        state = {"config": cfg.to_dict(), "seed": seed, "position": where, "method": method.state_dict(),
                 "extra": method.extra_state(), "rng": rng_state(), "record": record, **extra}
        checkpoint.save(checkpoint.latest_path(run_dir, seed), state)
        if where["done"] and cfg.save_models:
            checkpoint.save(checkpoint.task_path(run_dir, seed, where["task"]), state)

    engine.register(EvalHook(cfg.test_epoch, lambda task: evaluate(method, engine, data, task, cfg)[method.record]["acc"]))
    tensorboard = None
    if cfg.logger_type == "tensorboard":
        tensorboard = TensorBoardHook(os.path.join(run_dir, "tensorboard", f"seed{seed}"))
        engine.register(tensorboard)
    engine.register(CheckpointHook(cfg.checkpoint_every, save))
    log.info(f"seed {seed}: {len(data.tasks)} tasks {[t.total - t.known for t in data.tasks]}, "
             f"class order {data.class_order}" + (f"; resuming at task {first}" if resume is not None else ""))
    for task in data.tasks[first:]:
        method.task = task
        start = time.perf_counter()
        if position is None:  # a task resumed from inside already rebuilt its structure
            method.before_task(task)
        method.to(device)
        new_data = data.dataset("train", data.indices("train", task.classes))
        engine.train(method, task, method.stages(task, new_data, engine), resume=position)
        position = None
        method.after_task(task, engine)
        train_time = time.perf_counter() - start
        entry = task_entry(method, engine, data, task, cfg, run_dir, seed)
        entry["train_time_s"] = train_time
        add_task(record, entry)
        if task.index == len(data.tasks) - 1:
            record["complete"] = True
        save({"task": task.index, "done": True})
        if on_task is not None:
            on_task(record)
    if tensorboard is not None:
        tensorboard.finish(record)
    log.info(f"seed {seed}: last {cfg.eval_metric} {record['last_acc']:.2f}, average incremental "
             f"{record['avg_incremental_acc']:.2f}, forgetting {record['forgetting']:.2f}, BWT {record['bwt']:.2f}")
    return record


def run(cfg, device: torch.device, log_root: str = "logs", run_dir: str | None = None) -> tuple[dict, str]:
    """Train every seed in turn, or, given the folder of an unfinished run, continue it from its checkpoints.
    Returns the results and the run folder (which holds results.json)."""
    resuming = run_dir is not None
    run_dir = run_dir or run_folder(cfg, log_root)
    setup_logging(os.path.join(run_dir, "run.log"))
    try:
        results = ResultsFile(run_dir, cfg)
        if resuming and os.path.isfile(results.path):
            with open(results.path) as f:
                results.runs = [r for r in json.load(f)["runs"] if r.get("complete")]
        else:
            write_config(cfg, os.path.join(run_dir, "config.yaml"))
        log.info(f"run folder {run_dir} | method {cfg.method}, dataset {cfg.dataset}, backbone {cfg.backbone}, "
                 f"device {device}" + (" | resuming" if resuming else ""))
        done = {r["seed"] for r in results.runs}
        for seed in cfg.seed:
            if seed in done:
                continue
            latest = checkpoint.latest_path(run_dir, seed)
            state = read_checkpoint(latest, cfg, run_dir) if resuming and os.path.isfile(latest) else None
            results.runs.append(run_seed(cfg, seed, device, run_dir, on_task=results.write, resume=state))
            results.write()
        return results.finish(), run_dir
    finally:
        close_logging()
