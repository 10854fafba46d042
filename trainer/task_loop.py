"""THE task loop: for each task, before_task -> the task's stages -> after_task -> evaluation, then the metrics.

One `run_seed` per seed, with nothing shared between seeds (fresh data manager, method, engine, RNG and hooks).
"""
from __future__ import annotations

import logging
import os
import time

import torch

from datasets.scenario import DataManager
from methods import METHODS, build_method
from trainer.evaluation import evaluate, task_entry
from trainer.guards import check_finite, check_memory
from trainer.hooks import CheckpointHook, EvalHook, TensorBoardHook
from trainer.resume import read_results, restore, resume_point
from trainer.results import ResultsFile, RunLock, add_task, run_folder, write_config
from utils import checkpoint, distributed
from utils.checkpoint import rng_state
from utils.flops import InferenceCost
from utils.logging import close_logging, setup_logging
from utils.precision import DTYPES
from utils.seed import set_seed
from utils.train_loop import Engine

log = logging.getLogger("cl")


def build(cfg, seed: int, device: torch.device):
    """The data manager, method and engine of one seed, with the RNGs seeded."""
    set_seed(seed)
    single = METHODS.meta(cfg.method)["method_type"] in ("single_step", "pretrain")
    data = DataManager(cfg, seed, single_task=single)
    method = build_method(cfg, data)
    check_memory(cfg, data, method)
    return data, method, Engine(device, cfg.num_workers, cfg.amp, cfg.channels_last, seed, cfg.sync_bn,
                                DTYPES[cfg.precision])


def run_seed(cfg, seed: int, device: torch.device, run_dir: str, on_task=None, resume: dict | None = None,
             built=None, restored: tuple | None = None) -> dict:
    """Train one seed task by task (continuing from the checkpoint `resume` if given); returns its record.
    `built`: the seed's (data, method, engine) when `build` already made them; `restored`: what `restore` returned
    when the method was already restored from `resume`."""
    data, method, engine = built or build(cfg, seed, device)
    method.run_dir = run_dir  # where a method may write files of its own (contrastive_pretrain: the backbone)
    cost = InferenceCost()
    record = {"seed": seed, "class_order": data.class_order, "tasks": []}
    first, position = 0, None
    if resume is not None:
        record = resume["record"]
        first, position = restored or restore(method, data, resume, device, resume["path"])
    if distributed.is_main():
        os.makedirs(checkpoint.folder(run_dir), exist_ok=True)

    def save(where: dict, **extra) -> None:
        check_finite(method, engine, data, where)
        if not distributed.is_main():  # every rank holds the same state; rank 0 writes it
            return
        state = {"config": cfg.to_dict(), "seed": seed, "position": where, "method": method.state_dict(),
                 "extra": method.extra_state(), "rng": rng_state(), "record": record, **extra}
        checkpoint.save(checkpoint.latest_path(run_dir, seed), state)
        if where["done"] and cfg.save_models:
            checkpoint.save(checkpoint.task_path(run_dir, seed, where["task"]), state)

    def accuracy(task):  # mid-task, a classifier without means for the new classes yet reports the CNN's
        result = evaluate(method, engine, data, task, cfg)
        return result.get(method.record, result["cnn"])["acc"]

    engine.register(EvalHook(cfg.test_epoch, accuracy))
    tensorboard = None
    if cfg.logger_type == "tensorboard" and distributed.is_main():
        tensorboard = TensorBoardHook(os.path.join(run_dir, "tensorboard", f"seed{seed}"))
        engine.register(tensorboard)
    engine.register(CheckpointHook(cfg.checkpoint_every, save))
    log.info(f"seed {seed}: {len(data.tasks)} tasks {[t.total - t.known for t in data.tasks]}, "
             f"class order {data.class_order}" + (f"; resuming at task {first}" if resume is not None else ""))
    log.info(f"fast paths: {engine.describe()}")
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
        check_finite(method, engine, data, {"task": task.index, "done": True})
        entry = task_entry(method, engine, data, task, cfg, run_dir, seed, cost)
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
    Returns the results and the run folder (which holds results.json).

    Nothing is written before the config, the dataset, the backbone and the method of the first seed to run are
    validated (and, when resuming, the checkpoint it continues from); a resume never rewrites config.yaml.
    Only one process at a time works in a run folder (a lock the OS releases when the process ends)."""
    resuming = run_dir is not None
    main = distributed.is_main()  # of a distributed run, only rank 0 writes (every rank reads)
    lock = RunLock(run_dir) if resuming and main else None  # before reading what a running process may rewrite
    try:
        results_seen = read_results(run_dir) if resuming else None
        done = {r["seed"] for r in results_seen["runs"] if r.get("complete")} if results_seen else set()
        todo = [s for s in cfg.seed if s not in done]
        built = build(cfg, todo[0], device) if todo else None
        first_state, note, restored = None, None, None
        if resuming and todo:
            first_state, note = resume_point(run_dir, cfg, todo[0], len(built[0].tasks), results_seen)
            if first_state is not None:  # the checkpoint must fit the method before anything is written
                restored = restore(built[1], built[0], first_state, device, first_state["path"])
        if not resuming:
            run_dir = distributed.broadcast(run_folder(cfg, log_root) if main else None)
            lock = RunLock(run_dir) if main else None
        setup_logging(os.path.join(run_dir, "run.log"), quiet=not main)
        try:
            results = ResultsFile(run_dir, cfg)
            if results_seen is not None:
                results.runs = [r for r in results_seen["runs"] if r.get("complete")]
            if not resuming and main:
                write_config(cfg, os.path.join(run_dir, "config.yaml"))
            log.info(f"run folder {run_dir} | method {cfg.method}, dataset {cfg.dataset}, backbone {cfg.backbone}, "
                     f"device {device}" + (" | resuming" if resuming else ""))
            warning = check_memory(cfg, built[0], built[1]) if built else None
            if warning:
                log.warning(warning)
            for seed in todo:
                if seed == todo[0]:
                    state = first_state
                else:
                    built, restored = build(cfg, seed, device), None
                    state, note = resume_point(run_dir, cfg, seed, len(built[0].tasks), results_seen) \
                        if resuming else (None, None)
                if note:
                    log.warning(note)
                results.runs.append(run_seed(cfg, seed, device, run_dir, on_task=results.write, resume=state,
                                             built=built, restored=restored))
                built = None
                results.write()
            return results.finish(), run_dir
        finally:
            close_logging()
    finally:
        if lock is not None:
            lock.release()
