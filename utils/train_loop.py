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

from utils import distributed
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


def epoch_order(n: int, key: int | None) -> torch.Tensor:
    """The epoch's order of n samples: a permutation drawn from `key`, or 0..n-1 when key is None."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(key)) if key is not None else torch.arange(n)


def shard(order: torch.Tensor, batch_size: int, drop_last: bool, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's rows of each global batch of `order`: rows[rank::world] of every `batch_size` consecutive
    ones (the whole batch on a single process), so the ranks together see each global batch once."""
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[start: start + batch_size][rank::world] for start in range(0, stop, batch_size)]


class SeededSampler(torch.utils.data.Sampler):
    """A DataLoader batch sampler: this rank's indices of each global batch of one epoch (`shard` of the epoch's
    order); for a dataset that `takes_seeds`, each paired with the seed of its sample's augmentation, a function
    of the epoch's key and the index. The ranks' batches together are the global batches."""

    def __init__(self, n: int, shuffle: bool, seeds: bool, batch_size: int, drop_last: bool, rank: int, world: int):
        self.n, self.shuffle, self.seeds, self.key = n, shuffle, seeds, 0
        self.batch_size, self.drop_last, self.rank, self.world = batch_size, drop_last, rank, world

    def set_epoch(self, key: int) -> None:
        self.key = key

    def __len__(self) -> int:
        return sum(len(rows) > 0 for rows in shard(torch.arange(self.n), self.batch_size, self.drop_last, self.rank,
                                                   self.world))

    def __iter__(self):
        order = epoch_order(self.n, self.key if self.shuffle else None)
        seeds = np.random.SeedSequence(self.key).generate_state(self.n) if self.seeds else None
        for rows in shard(order, self.batch_size, self.drop_last, self.rank, self.world):
            if len(rows):  # (an inference pass's last batch may leave a rank without a sample)
                yield [(i, int(seeds[i])) for i in rows.tolist()] if seeds is not None else rows.tolist()


class Batches:
    """Device batches of one dataset, an epoch at a time: shuffled by the epoch's key or in order. Every sample is
    seen once per epoch; training drops only a last batch of a single sample (batch norm cannot normalise one
    sample of 1-d features). A view of an in-memory pool (`dataset.batched`) is gathered, augmented
    and normalised a whole batch at a time on the device; anything else goes through one DataLoader, whose
    workers persist from epoch to epoch."""

    def __init__(self, engine: "Engine", dataset, batch_size: int, shuffle: bool, whole: bool = False):
        self.engine, self.dataset, self.batch_size, self.shuffle = engine, dataset, batch_size, shuffle
        n, world = len(dataset), engine.world
        self.rank, self.world = (0, 1) if whole else (engine.rank, world)
        # a last batch too small for every rank to get a sample (or a lone one, which batch norm cannot normalise)
        self.drop_last = shuffle and 0 < n % batch_size < max(2, world) and n > batch_size
        self.loader = None
        if not getattr(dataset, "batched", False):
            workers = engine.num_workers
            self.sampler = SeededSampler(n, shuffle, shuffle and getattr(dataset, "takes_seeds", False), batch_size,
                                         self.drop_last, self.rank, self.world)
            self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=engine.cuda,
                                     persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                     generator=torch.Generator())

    def sizes(self) -> list[int]:
        """The number of samples of each global batch of an epoch (every rank's shares together)."""
        n = len(self.dataset)
        stop = n - n % self.batch_size if self.drop_last else n
        return [min(self.batch_size, stop - start) for start in range(0, stop, self.batch_size)]

    def epoch(self, key: int | None) -> Iterator[tuple]:
        """This rank's share of each batch of the epoch `key` (None: in order)."""
        to_device = self.engine.to_device
        if self.loader is not None:
            self.sampler.set_epoch(key or 0)
            for batch in self.loader:
                yield tuple(to_device(t) for t in batch)
            return
        key = key if self.shuffle else None
        generator = torch.Generator().manual_seed(key) if key is not None else None
        for rows in shard(epoch_order(len(self.dataset), key), self.batch_size, self.drop_last, self.rank,
                          self.world):
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
                 seed: int = 0, sync_bn: bool = False, dtype: torch.dtype = torch.float32):
        self.device, self.num_workers, self.seed, self.sync_bn = device, num_workers, seed, sync_bn
        self.dtype = dtype  # of the inputs and of every output `infer` returns (utils/precision.py)
        self.rank, self.world = distributed.rank(), distributed.world()
        self.cuda = device.type == "cuda"
        self.amp = amp and dtype == torch.float32 and bf16_native(device)
        self.channels_last = channels_last and device.type in ("cpu", "cuda")
        self.hooks: list[Hook] = []
        self.progress = sys.stderr.isatty()

    def describe(self) -> str:
        """The fast paths in use, for the run log."""
        return (f"{str(self.dtype).removeprefix('torch.')}, bfloat16 autocast {'on' if self.amp else 'off'}, "
                f"channels-last {'on' if self.channels_last else 'off'}, "
                f"{self.num_workers} DataLoader workers for file datasets"
                + (f", {self.world} processes (sync BN {'on' if self.sync_bn else 'off'})" if self.world > 1 else ""))

    def register(self, hook: Hook) -> None:
        self.hooks.append(hook)

    # ---- data ----
    def batches(self, dataset, batch_size: int, shuffle: bool, whole: bool = False) -> "Batches":
        """Batches of `dataset`, split between the ranks of a distributed run (`whole`: every rank all of them)."""
        return Batches(self, dataset, batch_size, shuffle, whole)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype if x.is_floating_point() else None, non_blocking=True)
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
        if self.sync_bn and self.world > 1:
            distributed.sync_batchnorm(method)
        with _trainable_only(method, stage.trains):
            params = [p for p in method.parameters() if p.requires_grad]
            if not params:
                raise RuntimeError(f"{type(method).__name__} has no trainable parameters in stage '{stage.name}'")
            step = stage.step
            if self.world > 1:  # the step through DistributedDataParallel: gradients averaged over the ranks
                from torch.nn.parallel import DistributedDataParallel

                step = DistributedDataParallel(_Step(method, stage.step), device_ids=[self.device] if self.cuda
                                               else None, find_unused_parameters=True)
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
                means = self._epoch(method, step, batches, optimizer, source.sizes())
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

    def _epoch(self, method, step: Callable, batches: Iterator[tuple], optimizer, sizes: list[int]
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
            loss.backward()
            method.before_optimizer_step()
            optimizer.step()
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
        every rank runs all of them, for a pass with side effects such as re-estimating BN statistics)."""
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        if self.channels_last:
            channels_last(module)
        whole = whole or len(dataset) < self.world  # every rank holds at least one row of its share
        outputs, targets = [], []
        try:
            for x, y, *_ in self.batches(dataset, batch_size, shuffle=False, whole=whole).epoch(None):
                with self.autocast():
                    out = fn(x)
                outputs.append({k: v.to(self.dtype) for k, v in out.items()} if isinstance(out, dict) else
                               out.to(self.dtype))
                targets.append(y)
        finally:
            for m, mode in modes:
                m.training = mode
        if outputs and isinstance(outputs[0], dict):
            merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        else:
            merged = torch.cat(outputs) if outputs else torch.zeros(0, device=self.device)
        y = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long, device=self.device)
        if self.world > 1 and not whole:
            rows = torch.cat([torch.cat(shard(torch.arange(len(dataset)), batch_size, False, r, self.world) or
                                        [torch.zeros(0, dtype=torch.long)]) for r in range(self.world)])
            merged, y = _unshard(merged, rows), _unshard(y, rows)
        return ({k: v.cpu() for k, v in merged.items()} if isinstance(merged, dict) else merged.cpu()), y.cpu()

    def features(self, network: torch.nn.Module, dataset) -> torch.Tensor:
        """Penultimate features `network(x)["features"]` of every sample, on the CPU."""
        network.to(self.device)
        return self.infer(lambda x: network(x)["features"], dataset, network)[0]


class _Step(torch.nn.Module):
    """A stage's step function as the forward of a module holding the method: what DistributedDataParallel
    wraps, so that the method's own calls inside the step are synchronised."""

    def __init__(self, method: torch.nn.Module, step: Callable):
        super().__init__()
        self.method, self.step = method, step

    def forward(self, *batch):
        return self.step(*batch)


def _unshard(t, rows: torch.Tensor):
    """Every rank's outputs of an in-order pass, concatenated in rank order and put back in the order of the
    dataset: `rows` holds the dataset row of each of them (`shard` of 0..n-1 for rank 0, then rank 1, ...)."""
    if isinstance(t, dict):
        return {k: _unshard(v, rows) for k, v in t.items()}
    parts = distributed.gather_cat(t)
    out = torch.empty_like(parts)
    out[rows.to(parts.device)] = parts
    return out


def _fmt(losses: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in losses.items())
