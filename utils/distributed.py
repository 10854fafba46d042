"""Data-parallel runs on torch.distributed: the process group, this process's rank, and the few collectives the
loops and methods need. Outside a distributed run (no WORLD_SIZE > 1 in the environment) every helper is the
identity, so single-process code pays nothing.

A run is distributed when launched by `torchrun` (or `--device 0,1`, which launches it through
torch.distributed.run): NCCL on CUDA, gloo on CPU. Every rank holds the whole method and the same RNG streams;
only the data of a training batch and of an inference pass is split between ranks (utils/train_loop.py), and
what a method computes outside the gradient step sees the gathered, full results, so it is the same everywhere.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import threading

import torch
import torch.distributed as dist
from torch import nn

#: how long a collective waits for a rank that stopped answering before the survivors give up
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("CL_DIST_TIMEOUT", "300")))


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device: torch.device) -> None:
    """Join the process group of a torchrun launch (once)."""
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, the only one that writes logs, results and checkpoints."""
    return rank() == 0


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order (ranks may hold different numbers of rows)."""
    if not active():
        return t
    sizes = [torch.zeros((), dtype=torch.long, device=t.device) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor(len(t), device=t.device))
    largest = int(max(sizes))
    padded = torch.zeros((largest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])


def gather_batch(t: torch.Tensor) -> torch.Tensor:
    """The whole global training batch from every rank's share of it, in the batch's order: the engine gives
    rank r the rows r, r + world, r + 2 world, ... of each global batch (utils/train_loop.py `shard`)."""
    if not active():
        return t
    parts = gather_cat(t)
    rows = torch.cat([torch.arange(r, len(parts), world()) for r in range(world())]).to(parts.device)
    return torch.empty_like(parts).index_copy_(0, rows, parts)


_replicated = threading.local()


@contextlib.contextmanager
def replicated():
    """Inside the block every rank feeds the network the same whole batch (GEM's memory gradients, DER++'s replay
    batches), so synchronised batch norm normalises each rank's batch by itself: the statistics would be the
    same, but counted `world` times (the running variance's n / (n - 1) would become wn / (wn - 1))."""
    before = getattr(_replicated, "on", False)
    _replicated.on = True
    try:
        yield
    finally:
        _replicated.on = before


class _SyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are those of the global batch (every rank's samples), through a
    differentiable all-reduce of the per-channel count, sum and sum of squares: what torch's SyncBatchNorm does
    (on CUDA only), on any device and backend, and local inside `replicated()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()) or getattr(_replicated, "on", False):
            return super().forward(x)
        from torch.distributed import _functional_collectives as collectives  # differentiable all_reduce

        stats = torch.cat([x.new_full((1,), x.numel() / x.shape[1]), x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))])
        count, total, squares = collectives.all_reduce(stats, "sum", dist.group.WORLD).split([1, x.shape[1],
                                                                                                x.shape[1]])
        mean = total / count
        var = squares / count - mean * mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean, momentum)
            self.running_var.lerp_(var * count / (count - 1).clamp(min=1), momentum)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of `module` normalising with global-batch statistics."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = _SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.running_mean.device)
            synced.load_state_dict(child.state_dict())
            synced.requires_grad_(any(p.requires_grad for p in child.parameters()))
            setattr(module, name, synced.train(child.training))
        else:
            sync_batchnorm(child)
    return module
