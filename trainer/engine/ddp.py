"""What a run of several processes adds to the loops: the training step through DistributedDataParallel
(gradients averaged over the ranks), batch norm over the global batch (`sync_bn`), and an inference pass's
sharded outputs put back in the dataset's order. The collectives themselves are in utils/distributed.py."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from utils import distributed
from utils.precision import upcast


class _Step(nn.Module):
    """A stage's step function as the forward of a module holding the method: what DistributedDataParallel
    wraps, so that the method's own calls inside the step are synchronised."""

    def __init__(self, method: nn.Module, step: Callable):
        super().__init__()
        self.method, self.step = method, step

    def forward(self, *batch):
        return self.step(*batch)


def synchronised_step(method: nn.Module, step: Callable, device: torch.device) -> Callable:
    """`step` run through DistributedDataParallel: the same call, with gradients averaged over the ranks."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_Step(method, step), device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def unshard(t, rows: torch.Tensor):
    """Every rank's outputs of an in-order pass, concatenated in rank order and put back in the order of the
    dataset: `rows` holds the dataset row of each of them (`shard` of 0..n-1 for rank 0, then rank 1, ...)."""
    if isinstance(t, dict):
        return {k: unshard(v, rows) for k, v in t.items()}
    parts = distributed.gather_cat(t)
    out = torch.empty_like(parts)
    out[rows.to(parts.device)] = parts
    return out


class _SyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are those of the global batch (every rank's samples), through a
    differentiable all-reduce of the per-channel count, sum and sum of squares: what torch's SyncBatchNorm does
    (on CUDA only), on any device and backend, and local inside `distributed.replicated()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.active()) or distributed.replicating():
            return super().forward(x)
        from torch.distributed import _functional_collectives as collectives  # differentiable all_reduce

        # statistics, running averages and the normalisation in at least float32 (as torch's batch norm under
        # autocast), the output in the input's dtype
        with torch.autocast(x.device.type, enabled=False):
            x32 = upcast(x)
            stats = torch.cat([x32.new_full((1,), x.numel() / x.shape[1]), x32.sum((0, 2, 3)),
                               (x32 * x32).sum((0, 2, 3))])
            count, total, squares = collectives.all_reduce(stats, "sum", dist.group.WORLD).split(
                [1, x.shape[1], x.shape[1]])
            mean = total / count
            var = squares / count - mean * mean
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * count / (count - 1).clamp(min=1)).to(self.running_var.dtype), momentum)
            y = (x32 - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
            if self.affine:
                y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


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
