"""THE training loop (`Engine.train` over a task's stages, `Engine.fit` for one stage) and THE inference loop
(`Engine.infer`): no method writes its own.

A task's training is the list of `Stage`s and `Action`s its method describes (utils/types.py). For a stage,
`fit` builds the optimiser and schedule from the stage's `OptimConfig` over the parameters it trains, and for
every batch calls `stage.step(x, y, ...)` -> dict of named losses (a method whose `train_data` yields extra
fields per sample, such as its position in the train pool, receives them as further arguments), sums them,
back-propagates, calls `method.before_optimizer_step()` (gradient surgery) and steps. After every epoch it calls
the registered hooks (checkpoints, per-epoch evaluation, TensorBoard; in registration order, each may add
metrics for the log line and the hooks after it) and logs the loss means. A non-finite loss stops the run
naming the task, stage and epoch. On CUDA: bfloat16 autocast, channels_last, pinned memory.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.checkpoint import set_rng_state
from utils.registry import UserError
from utils.types import Action, OptimConfig, Stage, Task

log = logging.getLogger("cl")


class NonFiniteLoss(UserError):
    pass


def build_optimizer(params, opt: OptimConfig) -> torch.optim.Optimizer:
    if opt.opt_type == "sgd":
        return torch.optim.SGD(params, lr=opt.lrate, momentum=opt.opt_mom, nesterov=opt.nesterov and opt.opt_mom > 0,
                               weight_decay=opt.weight_decay)
    optimizer = torch.optim.Adam if opt.opt_type == "adam" else torch.optim.AdamW
    return optimizer(params, lr=opt.lrate, weight_decay=opt.weight_decay)


def build_scheduler(optimizer, opt: OptimConfig):
    if opt.scheduler == "multi_step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(opt.milestones), gamma=opt.lrate_decay)
    if opt.scheduler == "cos":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(opt.epochs, 1))
    return None


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
    metrics: dict[str, float] = field(default_factory=dict)  # hooks add e.g. test_acc here


class Hook:
    """Called by the engine after every epoch of every stage."""

    def after_epoch(self, end: EpochEnd) -> None:
        pass


@contextlib.contextmanager
def _trainable_only(method: torch.nn.Module, trains: Callable | None):
    """Inside the block only the parameters of `trains()` require grad (all of them if None); the flags are
    restored afterwards."""
    if trains is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in method.parameters()]
    method.requires_grad_(False)
    for part in trains():
        part.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Engine:
    """Device, data loading and the two loops, shared by every method and stage."""

    def __init__(self, device: torch.device, num_workers: int = 0, amp: bool = True):
        self.device, self.num_workers = device, num_workers
        self.cuda = device.type == "cuda"
        self.amp = amp and self.cuda
        self.hooks: list[Hook] = []
        self.progress = sys.stderr.isatty()

    def register(self, hook: Hook) -> None:
        self.hooks.append(hook)

    def loader(self, dataset, batch_size: int, train: bool) -> DataLoader:
        """Training batches are shuffled with the global RNG (saved in checkpoints); inference batches come in
        order and draw nothing from it (a DataLoader seeds its workers from its generator), so evaluating,
        selecting exemplars or re-estimating BN statistics never changes what training draws next."""
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=self.num_workers,
                          pin_memory=self.cuda, persistent_workers=False, drop_last=train and len(dataset) > batch_size,
                          generator=None if train else torch.Generator())

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda and x.dim() == 4 else x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def train(self, method, task: Task, stages: list, resume: dict | None = None) -> None:
        """Run a task's stages and actions in order. `resume` (a checkpoint's position inside the task: stage
        name, epochs done, optimiser, scheduler and RNG state) skips what the checkpoint already holds and
        continues that stage after its last saved epoch."""
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"{type(method).__name__} names two stages alike: {names}")
        start = 0
        if resume is not None:
            if resume["stage"] not in names:
                raise UserError(f"the checkpoint stopped in stage '{resume['stage']}' of task {task.index}, which "
                                f"this method does not have (its stages: {', '.join(names)})")
            start = names.index(resume["stage"])
        for i, stage in enumerate(stages[start:], start):
            if isinstance(stage, Action):
                with torch.no_grad():
                    stage.run()
            else:
                self.fit(method, task, stage, resume if i == start else None)

    def fit(self, method, task: Task, stage: Stage, resume: dict | None = None) -> dict[str, float]:
        """Train one stage; returns the last epoch's mean losses."""
        opt = stage.optim
        method.to(self.device)
        if self.cuda:
            method.to(memory_format=torch.channels_last)
        with _trainable_only(method, stage.trains):
            params = [p for p in method.parameters() if p.requires_grad]
            if not params:
                raise RuntimeError(f"{type(method).__name__} has no trainable parameters in stage '{stage.name}'")
            optimizer = build_optimizer(params, opt)
            scheduler = build_scheduler(optimizer, opt)
            loader = self.loader(stage.data(), opt.batch_size, train=True)
            first_epoch = 0
            if resume is not None:
                optimizer.load_state_dict(resume["optimizer"])
                if scheduler is not None:
                    scheduler.load_state_dict(resume["scheduler"])
                first_epoch = resume["epoch"]
                set_rng_state(resume["rng"])
            means: dict[str, float] = {}
            epochs = tqdm(range(first_epoch, opt.epochs), desc=f"task {task.index} {stage.name}",
                          disable=not self.progress, leave=False)
            for epoch in epochs:
                start = time.perf_counter()
                means = self._epoch(method, stage, loader, optimizer)
                if not all(np.isfinite(v) for v in means.values()):
                    raise NonFiniteLoss(f"the loss became non-finite in task {task.index}, stage '{stage.name}', "
                                        f"epoch {epoch + 1} ({_fmt(means)}); lower the learning rate (lrate) and "
                                        "rerun")
                if scheduler is not None:
                    scheduler.step()
                seconds = time.perf_counter() - start
                end = EpochEnd(task, stage.name, epoch + 1, opt.epochs, means, optimizer, scheduler)
                for hook in self.hooks:
                    hook.after_epoch(end)
                log.info(f"task {task.index} {stage.name} epoch {epoch + 1}/{opt.epochs} {_fmt(means)} "
                         f"lr {optimizer.param_groups[0]['lr']:.4g} ({seconds:.1f} s)"
                         + "".join(f" {k} {v:.2f}" for k, v in end.metrics.items()))
        return means

    def _epoch(self, method, stage: Stage, loader: DataLoader, optimizer) -> dict[str, float]:
        sums, steps = {}, 0
        method.train()
        for batch in tqdm(loader, leave=False, disable=not self.progress):
            x, *rest = (self.to_device(t) for t in batch)  # (x, y), or (x, y, extra...) from train_data
            with self.autocast():
                losses = stage.step(x, *rest)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.before_optimizer_step()
            optimizer.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            steps += 1
        return {name: float(total) / max(steps, 1) for name, total in sums.items()}

    @torch.no_grad()
    def infer(self, fn: Callable, dataset, module: torch.nn.Module, batch_size: int = 256):
        """Run `fn(x)` -> tensor or dict of tensors over `dataset` with `module` in eval mode; outputs concatenated
        on the CPU, plus the targets. Every submodule's train/eval mode is restored afterwards."""
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        outputs, targets = [], []
        try:
            for x, y in self.loader(dataset, batch_size, train=False):
                with self.autocast():
                    out = fn(self.to_device(x))
                outputs.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict)
                               else out.float().cpu())
                targets.append(y)
        finally:
            for m, mode in modes:
                m.training = mode
        if outputs and isinstance(outputs[0], dict):
            merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        else:
            merged = torch.cat(outputs) if outputs else torch.zeros(0)
        return merged, torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)

    def features(self, network: torch.nn.Module, dataset) -> torch.Tensor:
        """Penultimate features `network(x)["features"]` of every sample, on the CPU."""
        network.to(self.device)
        return self.infer(lambda x: network(x)["features"], dataset, network)[0]


def _fmt(losses: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in losses.items())
