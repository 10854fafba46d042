"""Checkpoints: everything needed to continue a run exactly, as plain tensors, numbers, lists and dicts.

A checkpoint holds the method's state_dict and extra state (memory bank, old/frozen networks are submodules),
the position (task; and inside a task the training stage and epoch, with the optimiser and scheduler state),
the RNG states (python, numpy, torch, CUDA), the resolved config and the metrics so far. Files are written to a
temporary name and renamed, so a killed run never leaves a half-written checkpoint; they are read with
`map_location` and `weights_only=True`, so loading one cannot run code.

Files, in `<run folder>/checkpoints/`: `seed<S>_latest.pt` (rewritten after every task and every
`checkpoint_every` epochs) and, with `save_models: true`, `seed<S>_task<T>.pt` after each task.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from utils.registry import UserError

VERSION = 1


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str, data: dict) -> None:
    """Atomic write: a temporary file in the same folder, then a rename."""
    tmp = f"{path}.tmp"
    torch.save({"version": VERSION, **data}, tmp)
    os.replace(tmp, path)


def load(path: str) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt or not a checkpoint at all
        raise UserError(f"checkpoint '{path}' cannot be read ({type(err).__name__}); it is truncated or not a "
                        "checkpoint of this framework") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise UserError(f"checkpoint '{path}' is not a version-{VERSION} checkpoint of this framework")
    return data


def folder(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_path(run_dir: str, seed: int) -> str:
    return os.path.join(folder(run_dir), f"seed{seed}_latest.pt")


def task_path(run_dir: str, seed: int, task: int) -> str:
    return os.path.join(folder(run_dir), f"seed{seed}_task{task}.pt")
