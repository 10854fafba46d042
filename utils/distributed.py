"""Data-parallel runs on torch.distributed: the process group, this process's rank, and the few collectives the
loops and methods need. Outside a distributed run (no WORLD_SIZE > 1 in the environment) every helper is the
identity, so single-process code pays nothing.

A run is distributed when launched by `torchrun` (or `--device 0,1`, which launches it through
torch.distributed.run): NCCL on CUDA, gloo on CPU. Every rank holds the whole method and the same RNG streams;
only the data of a training batch and of an inference pass is split between ranks (trainer/engine/), and what
a method computes outside the gradient step sees the gathered, full results, so it is the same everywhere.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import threading

import torch
import torch.distributed as dist

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
    rank r the rows r, r + world, r + 2 world, ... of each global batch (trainer/engine/batches.py `shard`)."""
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
    before = replicating()
    _replicated.on = True
    try:
        yield
    finally:
        _replicated.on = before


def replicating() -> bool:
    """Whether this thread is inside `replicated()`."""
    return getattr(_replicated, "on", False)
