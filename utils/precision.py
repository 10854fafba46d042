"""The floating-point precision of a run: float32 (the default, with bfloat16 autocast where it is native), or
float64 for checking that two runs compute the same thing.

Why float64 exists: on resnet32 the float32 rounding of a reordered sum (another thread count, another process
count) grows within a few SGD steps into visibly different weights: 12 steps at lr 0.002 leave batch-norm biases
3-6% apart between one thread and two. In float64 the same 12 steps agree to 1e-14, so a distributed run and a
single process give the same predictions and the same accuracy matrix (tests/test_ddp_main.py).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def upcast(t: torch.Tensor) -> torch.Tensor:
    """`t` in at least float32: what losses and scores are computed in (a bfloat16 or float16 activation under
    autocast is widened; float32 and float64 stay as they are)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


@contextlib.contextmanager
def default_dtype(name: str):
    """Inside the block new floating tensors and parameters are `name` (float32 or float64); restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[name])
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
