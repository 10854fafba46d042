"""THE task loop: for each task, begin_task -> the task's stages -> end_task -> evaluation -> the hooks.

`run` trains every seed of a run in turn, each a `SeedRun` of its own (data manager, method, engine, RNG and
record: nothing shared between seeds), prepared the same way whether it is the first seed or not, new or
resumed. Building a seed validates the dataset, the backbone, the method and the checkpoint it resumes from;
the run folder is created only after the first seed to run has been built (`RunFolder.open`).
"""
from __future__ import annotations

import time

import torch

from datasets.scenario import DataManager
from methods import METHODS, build_method
from trainer import checkpoint
from trainer.device import machine
from trainer.engine.engine import Engine
from trainer.evaluation import task_entry
from trainer.flops import InferenceCost
from trainer.guards import check_finite, check_memory
from trainer.hooks import require_logger, run_hooks
from trainer.results import RunFolder, add_task
from trainer.resume import restore, resume_point
from trainer.seed import set_seed
from utils.precision import DTYPES


class SeedRun:
    """One seed of a run: its data manager, method and engine, the record of its tasks and where it starts (a
    resumed run: after the checkpoint `folder` holds for this seed). Building it reads but writes nothing."""

    def __init__(self, cfg, seed: int, device: torch.device, folder: RunFolder | None = None):
        set_seed(seed)
        self.cfg, self.seed, self.device = cfg, seed, device
        single = METHODS.meta(cfg.method)["method_type"] in ("single_step", "pretrain")
        self.data = DataManager(cfg, seed, single_task=single)
        self.method = build_method(cfg, self.data)
        self.memory_warning = check_memory(cfg, self.data, self.method)
        self.engine = Engine(device, cfg.num_workers, cfg.amp, cfg.channels_last, seed, cfg.sync_bn,
                             DTYPES[cfg.precision])
        self.cost = InferenceCost()
        self.record = {"seed": seed, "class_order": self.data.class_order, "tasks": []}
        self.first, self.position, self.note, self.resumed = 0, None, None, False
        self.predictions = None  # the last task's test predictions, with save_pred_record
        if folder is not None and folder.resuming:
            state, self.note = resume_point(folder.path, cfg, seed, len(self.data.tasks), folder.seen)
            if state is not None:  # the checkpoint must fit the method before anything is written
                self.record, self.resumed = state["record"], True
                self.first, self.position = restore(self.method, state, device)

    def train(self, run_dir: str, hooks: list) -> dict:
        """Train the seed task by task from where it starts; returns its record."""
        method, engine, data = self.method, self.engine, self.data
        method.run_dir = run_dir  # where a method may write files of its own (contrastive_pretrain: the backbone)
        environment = {**machine(self.device), **engine.fast_paths()}
        history = self.record.setdefault("environment", [])  # every machine a (resumed) seed ran on
        if not history or history[-1] != environment:
            history.append(environment)
        for hook in hooks:
            engine.register(hook)
            hook.before_run(self)
        for task in data.tasks[self.first:]:
            start = time.perf_counter()
            resume, self.position = self.position, None
            if resume is None:  # a task resumed from inside was rebuilt by the restore
                method.begin_task(task)
            method.to(self.device)
            new_data = data.dataset("train", data.indices("train", task.classes))
            engine.train(method, task, method.stages(task, new_data, engine.infer), resume=resume)
            method.end_task(task, engine.infer)
            entry = self.record_task(task, time.perf_counter() - start)
            for hook in hooks:
                hook.after_task(self, entry)
        for hook in hooks:
            hook.after_run(self)
        return self.record

    def record_task(self, task, train_time: float) -> dict:
        """Evaluate the model after `task` (refused if it is not finite) and add the task to the record."""
        check_finite(self.method, self.engine, self.data, {"task": task.index, "done": True})
        entry, self.predictions = task_entry(self.method, self.engine, self.data, task, self.cfg, self.cost)
        entry["train_time_s"] = train_time
        entry["weights_sha256"] = checkpoint.digest(self.method.state_dict(), self.method.extra_state())
        add_task(self.record, entry)
        if task.index == len(self.data.tasks) - 1:
            self.record["complete"] = True
        return entry


def run(cfg, device: torch.device, log_root: str = "logs", run_dir: str | None = None) -> str:
    """Train every seed in turn, or, given the folder of an unfinished run, continue it from its checkpoints.
    Returns the run folder (which holds results.json).

    Nothing is written before the config, the dataset, the backbone and the method of the first seed to run are
    validated (and, when resuming, the checkpoint it continues from); a resume never rewrites config.yaml.
    Only one process at a time works in a run folder (a lock the OS releases when the process ends)."""
    require_logger(cfg)
    with RunFolder(cfg, log_root, run_dir) as folder:
        for seed in folder.seeds_to_run():
            seed_run = SeedRun(cfg, seed, device, folder)
            folder.open(device)
            seed_run.train(folder.path, run_hooks(cfg, folder.path, folder.results))
        folder.results.finish()
        return folder.path
