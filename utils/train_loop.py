"""THE training loop (`Engine.train` over a task's stages, `Engine.fit` for one stage) and THE inference loop
(`Engine.infer`): no method writes its own.

A task's training is the list of `Stage`s and `Action`s its method describes (utils/types.py). For a stage,
`fit` builds the optimiser and schedule from the stage's `OptimConfig` over the parameters it trains, and for
every batch calls `stage.step(x, y, ...)` -> dict of named losses (a method whose `train_data` yields extra
fields per sample, such as its position in the train pool, receives them as further arguments), sums them,
back-propagates, calls `method.before_optimizer_step()` (gradient surgery) and steps. After every epoch it checks
that the loss and every parameter and buffer are finite (else it stops, naming task, stage and epoch, before any
hook can save the model), then calls the registered hooks (per-epoch evaluation, TensorBoard, checkpoints; in
registration order, each may add metrics for the log line and the hooks after it) and logs the loss means.

Data: an epoch's order and augmentation come from a generator seeded by (run seed, task, stage, epoch)
(`epoch_key`), never from the global RNG, so they do not depend on the number of workers, on the device, or on
whether the run was resumed. Views of in-memory pools (datasets/base.py) are read a batch at a time and
augmented on the device; file datasets are decoded in DataLoader workers, each sample's augmentation seeded
from the epoch's key and its index.

Fast paths: channels-last images and convolution weights (CPU and CUDA, `channels_last`), bfloat16 autocast where
it is native (CUDA; CPUs with AVX512-BF16 or AMX; `amp`), pinned memory and persistent, prefetching workers for
file datasets on CUDA.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.checkpoint import set_rng_state
from utils.registry import UserError
from utils.types import Action, OptimConfig, Stage, Task

log = logging.getLogger("cl")


class NonFiniteLoss(UserError):
    """The loss or the weights became NaN or infinite."""


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays off: on CUDA, and on CPUs with native bfloat16 (AVX512-BF16 or AMX);
    elsewhere it is emulated and about ten times slower than float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def epoch_key(seed: int, task: int, stage: str, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation: a function of run seed, task, stage and epoch only."""
    return int(np.random.SeedSequence([seed, task, zlib.crc32(stage.encode()), epoch]).generate_state(1)[0])


class SeededSampler(torch.utils.data.Sampler):
    """One epoch's indices, shuffled by the epoch's key (or in order); for a dataset that `takes_seeds`, each
    paired with the seed of its sample's augmentation, a function of the key and the index."""

    def __init__(self, n: int, shuffle: bool, seeds: bool):
        self.n, self.shuffle, self.seeds, self.key = n, shuffle, seeds, 0

    def set_epoch(self, key: int) -> None:
        self.key = key

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.key)) if self.shuffle \
            else torch.arange(self.n)
        seeds = np.random.SeedSequence(self.key).generate_state(self.n) if self.seeds else None
        for i in order.tolist():
            yield (i, int(seeds[i])) if seeds is not None else i


class Batches:
    """Device batches of one dataset, an epoch at a time: shuffled by the epoch's key (dropping a last partial
    batch, as training does) or in order. A view of an in-memory pool (`dataset.batched`) is gathered, augmented
    and normalised a whole batch at a time on the device; anything else goes through one DataLoader, whose
    workers persist from epoch to epoch."""

    def __init__(self, engine: "Engine", dataset, batch_size: int, shuffle: bool):
        self.engine, self.dataset, self.batch_size, self.shuffle = engine, dataset, batch_size, shuffle
        self.drop_last = shuffle and len(dataset) > batch_size
        self.loader = None
        if not getattr(dataset, "batched", False):
            workers = engine.num_workers
            self.sampler = SeededSampler(len(dataset), shuffle, seeds=shuffle and getattr(dataset, "takes_seeds", False))
            self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                     pin_memory=engine.cuda, drop_last=self.drop_last, persistent_workers=workers > 0,
                                     prefetch_factor=4 if workers else None, generator=torch.Generator())

    def epoch(self, key: int) -> Iterator[tuple]:
        to_device = self.engine.to_device
        if self.loader is not None:
            self.sampler.set_epoch(key)
            for batch in self.loader:
                yield tuple(to_device(t) for t in batch)
            return
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(key) if self.shuffle else None
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            rows = order[start: start + self.batch_size]
            yield tuple(to_device(t) for t in self.dataset.batch(rows, self.engine.device, generator))


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


def channels_last(module: torch.nn.Module) -> None:
    """Convolution weights in channels-last memory format (the layout the CPU and CUDA kernels prefer)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.to(memory_format=torch.channels_last)


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
                 seed: int = 0):
        self.device, self.num_workers, self.seed = device, num_workers, seed
        self.cuda = device.type == "cuda"
        self.amp = amp and bf16_native(device)
        self.channels_last = channels_last and device.type in ("cpu", "cuda")
        self.hooks: list[Hook] = []
        self.progress = sys.stderr.isatty()

    def describe(self) -> str:
        """The fast paths in use, for the run log."""
        return (f"bfloat16 autocast {'on' if self.amp else 'off'}, channels-last {'on' if self.channels_last else 'off'}"
                f", {self.num_workers} DataLoader workers for file datasets")

    def register(self, hook: Hook) -> None:
        self.hooks.append(hook)

    # ---- data ----
    def batches(self, dataset, batch_size: int, shuffle: bool) -> "Batches":
        return Batches(self, dataset, batch_size, shuffle)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

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
        with _trainable_only(method, stage.trains):
            params = [p for p in method.parameters() if p.requires_grad]
            if not params:
                raise RuntimeError(f"{type(method).__name__} has no trainable parameters in stage '{stage.name}'")
            optimizer = build_optimizer(params, opt)
            scheduler = build_scheduler(optimizer, opt)
            source = self.batches(stage.data(), opt.batch_size, shuffle=True)
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
                batches = source.epoch(epoch_key(self.seed, task.index, stage.name, epoch))
                means = self._epoch(method, stage, batches, optimizer)
                where = f"task {task.index}, stage '{stage.name}', epoch {epoch + 1}"
                if not all(np.isfinite(v) for v in means.values()):
                    raise NonFiniteLoss(f"the loss became non-finite in {where} ({_fmt(means)}); lower the learning "
                                        "rate (lrate) and rerun")
                broken = first_non_finite(method)
                if broken is not None:
                    raise NonFiniteLoss(f"the weights became non-finite in {where} ('{broken}'); lower the learning "
                                        "rate (lrate) and rerun: the last checkpoint is kept")
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

    def _epoch(self, method, stage: Stage, batches: Iterator[tuple], optimizer) -> dict[str, float]:
        sums, steps = {}, 0
        method.train()
        for batch in tqdm(batches, leave=False, disable=not self.progress):
            with self.autocast():
                losses = stage.step(*batch)  # (x, y), or (x, y, extra...) from train_data
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.before_optimizer_step()
            optimizer.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            steps += 1
        return {name: float(total) / max(steps, 1) for name, total in sums.items()}

    # ---- inference ----
    @torch.no_grad()
    def infer(self, fn: Callable, dataset, module: torch.nn.Module, batch_size: int = 256):
        """Run `fn(x)` -> tensor or dict of tensors over `dataset` in order, with `module` in eval mode; outputs
        concatenated on the CPU, plus the targets. Every submodule's train/eval mode is restored afterwards."""
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        if self.channels_last:
            channels_last(module)
        outputs, targets = [], []
        try:
            for x, y, *_ in self.batches(dataset, batch_size, shuffle=False).epoch(0):
                with self.autocast():
                    out = fn(x)
                outputs.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict)
                               else out.float().cpu())
                targets.append(y.cpu())
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
