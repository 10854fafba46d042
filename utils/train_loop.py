"""THE training loop (`Engine.fit`) and THE inference loop (`Engine.infer`): no method writes its own.

`fit` builds the optimiser and schedule from an `OptimConfig`, and for every batch calls
`method.training_step(x, y)` -> dict of named losses (a method whose `train_data` yields extra fields per
sample, such as its position in the train pool, receives them as further arguments), sums them, back-propagates, calls
`method.before_optimizer_step()` (gradient surgery) and steps. Loss means are logged per epoch; a non-finite
loss stops the run naming the task and epoch. On CUDA: bfloat16 autocast, channels_last, pinned memory.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.registry import UserError

log = logging.getLogger("cl")


class NonFiniteLoss(UserError):
    pass


@dataclass(frozen=True)
class OptimConfig:
    epochs: int
    lrate: float
    batch_size: int
    opt_type: str = "sgd"
    opt_mom: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str | None = None
    milestones: tuple = ()
    lrate_decay: float = 0.1

    @classmethod
    def from_config(cls, cfg, first_task: bool) -> "OptimConfig":
        """The plain keys; in the first task each `init_*` key that is set replaces its plain key."""

        def pick(name):
            init = getattr(cfg, "init_" + name)
            return init if first_task and init is not None else getattr(cfg, name)

        return cls(epochs=pick("epochs"), lrate=pick("lrate"), batch_size=cfg.batch_size, opt_type=cfg.opt_type,
                   opt_mom=pick("opt_mom"), nesterov=pick("nesterov"), weight_decay=pick("weight_decay"),
                   scheduler=pick("scheduler"), milestones=tuple(pick("milestones")), lrate_decay=pick("lrate_decay"))

    def replace(self, **changes) -> "OptimConfig":
        return replace(self, **changes)


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


class Engine:
    """Device, data loading and the two loops, shared by every method and stage."""

    def __init__(self, device: torch.device, num_workers: int = 0, amp: bool = True, test_epoch: int = 0,
                 writer=None):
        self.device, self.num_workers, self.test_epoch, self.writer = device, num_workers, test_epoch, writer
        self.cuda = device.type == "cuda"
        self.amp = amp and self.cuda
        self.task_index = 0
        self.fit_index = 0  # how many fit calls the current task has made (a task may train in stages)
        self.epoch_eval: Callable[[], float] | None = None  # set by the runner: seen-class accuracy
        self.on_epoch_end: Callable | None = None  # set by the runner: mid-task checkpoints
        self.resume_from: dict | None = None  # set by the runner: the mid-task checkpoint to continue from
        self.progress = sys.stderr.isatty()

    def start_task(self, index: int) -> None:
        self.task_index, self.fit_index = index, 0

    def loader(self, dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=self.num_workers,
                          pin_memory=self.cuda, persistent_workers=False,
                          drop_last=train and len(dataset) > batch_size)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda and x.dim() == 4 else x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def fit(self, method, dataset, opt: OptimConfig, stage: str = "train") -> dict[str, float]:
        """Train `method` on `dataset` for `opt.epochs` epochs; returns the last epoch's mean losses.

        When resuming inside a task, the stages that the checkpoint already finished are skipped (their effect
        is in the loaded weights) and the interrupted one continues after its last saved epoch."""
        fit_index, self.fit_index = self.fit_index, self.fit_index + 1
        resume = self.resume_from
        if resume is not None and fit_index < resume["fit_index"]:
            return {}
        method.to(self.device)
        if self.cuda:
            method.to(memory_format=torch.channels_last)
        params = [p for p in method.parameters_to_optimize() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(method).__name__} has no trainable parameters in stage '{stage}'")
        optimizer = build_optimizer(params, opt)
        scheduler = build_scheduler(optimizer, opt)
        loader = self.loader(dataset, opt.batch_size, train=True)
        means: dict[str, float] = {}
        first_epoch = 0
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(resume["scheduler"])
            first_epoch, self.resume_from = resume["epoch"], None
            resume["restore_rng"]()
        epochs = tqdm(range(first_epoch, opt.epochs), desc=f"task {self.task_index} {stage}",
                      disable=not self.progress, leave=False)
        for epoch in epochs:
            start, sums, steps = time.perf_counter(), {}, 0
            method.train()
            for batch in tqdm(loader, leave=False, disable=not self.progress):
                x, *rest = (self.to_device(t) for t in batch)  # (x, y), or (x, y, extra...) from train_data
                with self.autocast():
                    losses = method.training_step(x, *rest)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                method.before_optimizer_step()
                optimizer.step()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                steps += 1
            means = {name: float(total) / max(steps, 1) for name, total in sums.items()}
            if not all(np.isfinite(v) for v in means.values()):
                raise NonFiniteLoss(f"the loss became non-finite in task {self.task_index}, stage '{stage}', epoch "
                                    f"{epoch + 1} ({_fmt(means)}); lower the learning rate (lrate) and rerun")
            if scheduler is not None:
                scheduler.step()
            line = f"task {self.task_index} {stage} epoch {epoch + 1}/{opt.epochs} {_fmt(means)} " \
                   f"lr {optimizer.param_groups[0]['lr']:.4g} ({time.perf_counter() - start:.1f} s)"
            if self.test_epoch and self.epoch_eval is not None and (epoch + 1) % self.test_epoch == 0:
                accuracy = self.epoch_eval()
                line += f" test_acc {accuracy:.2f}"
                self._scalar(f"task{self.task_index}/{stage}/test_acc", accuracy, epoch)
            log.info(line)
            for name, value in means.items():
                self._scalar(f"task{self.task_index}/{stage}/{name}", value, epoch)
            if self.on_epoch_end is not None:
                self.on_epoch_end(fit_index, epoch + 1, optimizer, scheduler)
        return means

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    @torch.no_grad()
    def infer(self, fn: Callable, dataset, module: torch.nn.Module, batch_size: int = 256):
        """Run `fn(x)` -> tensor or dict of tensors over `dataset` in eval mode; outputs concatenated on the CPU,
        plus the targets."""
        was_training = module.training
        module.eval()
        outputs, targets = [], []
        for x, y in self.loader(dataset, batch_size, train=False):
            with self.autocast():
                out = fn(self.to_device(x))
            outputs.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict) else out.float().cpu())
            targets.append(y)
        module.train(was_training)
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
