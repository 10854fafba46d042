"""The floating-point precision of a run: float32 (the default, with autocast where it pays off, see
trainer/engine/fastpath.py), or float64 for checking that two runs compute the same thing; and how the parts that
must not lose precision under autocast keep it: `upcast` widens an activation, `full_precision` runs a function
with autocast off (a matrix product under autocast would re-cast its float32 inputs to bfloat16).

Why float64 exists: on resnet32 the float32 rounding of a reordered sum (another thread count, another process
count) grows within a few SGD steps into visibly different weights: 12 steps at lr 0.002 leave batch-norm biases
3-6% apart between one thread and two. In float64 the same 12 steps agree to 1e-14, so a distributed run and a
single process give the same predictions and the same accuracy matrix (tests/test_ddp_main.py).
"""
from __future__ import annotations

import contextlib
import functools

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def upcast(t: torch.Tensor) -> torch.Tensor:
    """`t` in at least float32: what losses and scores are computed in (a bfloat16 or float16 activation under
    autocast is widened; float32 and float64 stay as they are)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def full_precision(fn):
    """Decorate `fn` (a loss, a similarity, a distance) to run with autocast off and its tensor arguments widened
    to at least float32, so that it computes in float32 (float64 in a float64 run) whatever autocast is on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*(upcast(a) if isinstance(a, torch.Tensor) else a for a in args), **kwargs)

    return wrapper


@contextlib.contextmanager
def default_dtype(name: str):
    """Inside the block new floating tensors and parameters are `name` (float32 or float64); restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[name])
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
