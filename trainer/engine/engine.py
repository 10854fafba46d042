"""THE training loop (`Engine.train` over a task's stages, `Engine.fit` for one stage) and THE inference loop
(`Engine.infer`): no method writes its own.

A task's training is the list of `Stage`s and `Action`s its method describes (utils/types.py). For a stage,
`fit` builds the optimiser and schedule from the stage's `OptimConfig` over the parameters it trains, and for
every batch calls `stage.step(x, y, ...)` -> dict of named losses (a method whose `train_data` yields extra
fields per sample, such as its position in the train pool, receives them as further arguments), sums them,
back-propagates, calls `method.before_optimizer_step()` (gradient surgery) and steps. After every epoch it checks
that the loss and every parameter and buffer are finite (else it stops, naming task, stage and epoch, before any
hook can save the model), then calls the hooks' `after_epoch` (trainer/engine/hooks.py).

Fast paths (trainer/engine/fastpath.py): channels-last images and convolution weights (CPU and CUDA,
`channels_last`), autocast where it pays off (`amp`: bfloat16 on recent GPUs and on CPUs with AVX512-BF16 or AMX,
float16 with gradient scaling on GPUs before compute capability 8.0), pinned memory and persistent, prefetching
workers for file datasets on CUDA. Batches: trainer/engine/batches.py;
several processes: trainer/engine/ddp.py.
"""
from __future__ import annotations

import contextlib
import itertools
import sys
import time
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from trainer.engine import ddp
from trainer.engine.batches import Batches, epoch_key, shard
from trainer.engine.fastpath import autocast_dtype, channels_last
from trainer.engine.hooks import EpochEnd, Hook
from trainer.engine.optim import build_optimizer, build_scheduler
from trainer.seed import set_rng_state
from utils import distributed
from utils.modes import eval_mode
from utils.registry import UserError
from utils.types import Action, Stage, Task


class NonFiniteLoss(UserError):
    """The loss or the weights became NaN or infinite."""


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


def first_non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or floating-point buffer holding a NaN or an infinity, or None."""
    tensors = [(n, t) for n, t in itertools.chain(module.named_parameters(), module.named_buffers())
               if t.is_floating_point() and t.numel()]
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()
    return next((n for (n, _), ok in zip(tensors, finite) if not ok), None)


class Engine:
    """Device, data loading and the two loops, shared by every method and stage of one seed."""

    def __init__(self, device: torch.device, num_workers: int = 0, amp: bool = True, channels_last: bool = True,
                 seed: int = 0, sync_bn: bool = False, dtype: torch.dtype = torch.float32):
        self.device, self.num_workers, self.seed, self.sync_bn = device, num_workers, seed, sync_bn
        self.dtype = dtype  # of the inputs and of every output `infer` returns (utils/precision.py)
        self.rank, self.world = distributed.rank(), distributed.world()
        self.autocast_dtype = autocast_dtype(device) if amp and dtype == torch.float32 else None
        self.amp = self.autocast_dtype is not None
        self.channels_last = channels_last and device.type in ("cpu", "cuda")
        self.hooks: list[Hook] = []
        self.progress = sys.stderr.isatty()

    def fast_paths(self) -> dict:
        """The precision and fast paths in use (recorded in results.json beside the numbers they produced)."""
        name = (lambda dtype: str(dtype).removeprefix("torch.") if dtype is not None else None)
        return {"precision": name(self.dtype), "autocast": name(self.autocast_dtype),
                "gradient_scaling": self.autocast_dtype == torch.float16, "channels_last": self.channels_last,
                "processes": self.world, "sync_bn": self.sync_bn and self.world > 1}

    def describe(self) -> str:
        """The fast paths in use, for the run log."""
        paths = self.fast_paths()
        autocast = f"{paths['autocast']} autocast" if paths["autocast"] else "no autocast"
        return (f"{paths['precision']}, {autocast}" + (" with gradient scaling" if paths["gradient_scaling"] else "")
                + f", channels-last {'on' if self.channels_last else 'off'}, "
                f"{self.num_workers} DataLoader workers for file datasets"
                + (f", {self.world} processes (sync BN {'on' if self.sync_bn else 'off'})" if self.world > 1 else ""))

    def register(self, hook: Hook) -> None:
        """Call `hook.after_epoch` after every epoch (after the hooks registered before it)."""
        self.hooks.append(hook)

    # ---- data ----
    def batches(self, dataset, batch_size: int, shuffle: bool, whole: bool = False) -> Batches:
        """Batches of `dataset`, split between the ranks of a distributed run (`whole`: every rank all of them)."""
        rank, world = (0, 1) if whole else (self.rank, self.world)
        return Batches(dataset, batch_size, shuffle, self.device, self.to_device, rank, world, self.num_workers)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype if x.is_floating_point() else None, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.amp)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for a stage under float16 autocast (whose small gradients would underflow)."""
        return torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None

    # ---- training ----
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
        if self.channels_last:
            channels_last(method)
        if self.sync_bn and self.world > 1:
            ddp.sync_batchnorm(method)
        with _trainable_only(method, stage.trains):
            params = [p for p in method.parameters() if p.requires_grad]
            if not params:
                raise RuntimeError(f"{type(method).__name__} has no trainable parameters in stage '{stage.name}'")
            step = ddp.synchronised_step(method, stage.step, self.device) if self.world > 1 else stage.step
            optimizer = build_optimizer(params, opt)
            scheduler = build_scheduler(optimizer, opt)
            scaler = self.scaler()
            source = self.batches(stage.data(), opt.batch_size, shuffle=True)
            first_epoch = 0
            if resume is not None:
                optimizer.load_state_dict(resume["optimizer"])
                if scheduler is not None:
                    scheduler.load_state_dict(resume["scheduler"])
                if scaler is not None and resume.get("scaler"):
                    scaler.load_state_dict(resume["scaler"])
                first_epoch = resume["epoch"]
                set_rng_state(resume["rng"])
            means: dict[str, float] = {}
            epochs = tqdm(range(first_epoch, opt.epochs), desc=f"task {task.index} {stage.name}",
                          disable=not self.progress, leave=False)
            for epoch in epochs:
                start = time.perf_counter()
                batches = source.epoch(epoch_key(self.seed, task.index, stage.name, epoch))
                means = self._epoch(method, step, batches, optimizer, scaler, source.sizes())
                where = f"task {task.index}, stage '{stage.name}', epoch {epoch + 1}"
                if not all(np.isfinite(v) for v in means.values()):
                    raise NonFiniteLoss(f"the loss became non-finite in {where} ({format_losses(means)}); lower the "
                                        "learning rate (lrate) and rerun")
                broken = first_non_finite(method)
                if broken is not None:
                    raise NonFiniteLoss(f"the weights became non-finite in {where} ('{broken}'); lower the learning "
                                        "rate (lrate) and rerun: the last checkpoint is kept")
                if scheduler is not None:
                    scheduler.step()
                end = EpochEnd(task, stage.name, epoch + 1, opt.epochs, means, optimizer, scheduler,
                               time.perf_counter() - start, scaler)
                for hook in self.hooks:
                    hook.after_epoch(end)
        return means

    def _epoch(self, method, step: Callable, batches: Iterator[tuple], optimizer, scaler, sizes: list[int]
               ) -> dict[str, float]:
        sums, steps = {}, 0
        method.train()
        for batch, size in zip(tqdm(batches, leave=False, disable=not self.progress), sizes):
            with self.autocast():
                losses = step(*batch)  # (x, y), or (x, y, extra...) from train_data
            # DDP averages the ranks' gradients: each rank's mean loss is weighed by its share of the global batch,
            # so that a last batch of 23 shared 12 + 11 gives the gradient of its mean over 23 as one process does
            share = len(batch[0]) * self.world / size
            loss = sum(losses.values()) * share
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                method.before_optimizer_step()
                optimizer.step()
            else:  # float16: the gradients of the scaled loss, unscaled before any gradient surgery
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                method.before_optimizer_step()
                scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
                scaler.update()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * share
            steps += 1
        means = {name: float(total) / max(steps, 1) for name, total in sums.items()}
        if self.world > 1:  # the epoch's loss means over every rank's batches
            names = sorted(means)
            values = torch.tensor([means[n] for n in names], device=self.device)
            torch.distributed.all_reduce(values)
            means = dict(zip(names, (values / self.world).tolist()))
        return means

    # ---- inference ----
    @torch.no_grad()
    def infer(self, fn: Callable, dataset, module: torch.nn.Module, batch_size: int = 256, whole: bool = False):
        """Run `fn(x)` -> tensor or dict of tensors over `dataset` in order, with `module` in eval mode; outputs
        concatenated on the CPU, plus the targets. Every submodule's train/eval mode is restored afterwards.
        In a distributed run each rank runs its share and every rank gets every output, in order (`whole`:
        every rank runs all of them, for a pass with side effects such as re-estimating BN statistics).
        What a method may ask of the engine (utils.types.Inference)."""
        if self.channels_last:
            channels_last(module)
        whole = whole or len(dataset) < self.world  # every rank holds at least one row of its share
        outputs, targets = [], []
        with eval_mode(module):
            for x, y, *_ in self.batches(dataset, batch_size, shuffle=False, whole=whole).epoch(None):
                with self.autocast():
                    out = fn(x)
                outputs.append({k: v.to(self.dtype) for k, v in out.items()} if isinstance(out, dict) else
                               out.to(self.dtype))
                targets.append(y)
        if outputs and isinstance(outputs[0], dict):
            merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        else:
            merged = torch.cat(outputs) if outputs else torch.zeros(0, device=self.device)
        y = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long, device=self.device)
        if self.world > 1 and not whole:
            rows = torch.cat([torch.cat(shard(torch.arange(len(dataset)), batch_size, False, r, self.world) or
                                        [torch.zeros(0, dtype=torch.long)]) for r in range(self.world)])
            merged, y = ddp.unshard(merged, rows), ddp.unshard(y, rows)
        return ({k: v.cpu() for k, v in merged.items()} if isinstance(merged, dict) else merged.cpu()), y.cpu()


def format_losses(losses: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in losses.items())
