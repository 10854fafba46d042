"""Continuing a run from its checkpoints: which config a run folder holds, whether it is finished, and how a
method is rebuilt to the state a checkpoint recorded.

A method is restored by replaying `before_task` for every task the checkpoint reached (which rebuilds its
structure: heads, adapters, branches, frozen copies), then loading its state_dict and extra state. Inside a
task, the engine is handed the position (stage name, epochs done, optimiser, scheduler, RNG) to continue from.
"""
from __future__ import annotations

import json
import os

import torch

from utils import checkpoint
from utils.checkpoint import set_rng_state
from utils.config import RUNTIME_KEYS, load_config
from utils.registry import UserError


def saved_config(run_dir: str, config_path: str | None, cli: dict, method_keys):
    """The config of the run in `run_dir`; command-line keys may only change where it runs, and a --config given
    beside it must resolve to the same config."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--checkpoint_dir '{run_dir}' does not exist")
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        raise UserError(f"--checkpoint_dir '{run_dir}' is not a run folder (no config.yaml); give the folder a run "
                        "printed when it started")
    changed = sorted(set(cli) - set(RUNTIME_KEYS))
    if changed:
        raise UserError(f"--{changed[0]} cannot change when resuming or re-testing a run (only "
                        f"{', '.join(RUNTIME_KEYS)} can); start a new run instead")
    cfg = load_config(saved_path, cli, method_keys)
    if config_path:
        given = load_config(config_path, cli, method_keys).to_dict()
        diff = [k for k, v in cfg.to_dict().items() if k not in RUNTIME_KEYS and given.get(k) != v]
        if diff:
            raise UserError(f"--checkpoint_dir '{run_dir}' holds a run of another config: '{diff[0]}' is "
                            f"{cfg.to_dict()[diff[0]]!r} there and {given.get(diff[0])!r} in {config_path}")
    return cfg


def is_finished(run_dir: str, cfg) -> bool:
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            runs = json.load(f)["runs"]
    except (ValueError, KeyError):
        raise UserError(f"'{path}' is corrupt; remove it to resume from the checkpoints") from None
    return {r["seed"] for r in runs if r.get("complete")} >= set(cfg.seed)


def without_runtime(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def read_checkpoint(path: str, cfg, run_dir: str) -> dict:
    """A checkpoint of this run: written with the run's config (apart from the runtime keys)."""
    state = checkpoint.load(path)
    if without_runtime(state["config"]) != without_runtime(cfg.to_dict()):
        raise UserError(f"checkpoint '{path}' was written with another config than {run_dir}/config.yaml")
    return state


def load_method(method, state: dict, device: torch.device) -> None:
    method.to(device)
    method.load_state_dict(state["method"])
    method.load_extra_state(state["extra"])


def restore(method, data, state: dict, device: torch.device) -> tuple[int, dict | None]:
    """Rebuild the method's structure up to the checkpoint's task and load its state. Returns the task to run
    next and, for a checkpoint taken inside that task, the position the engine continues from."""
    position = state["position"]
    for task in data.tasks[: position["task"] + 1]:
        method.task = task
        method.before_task(task)
    load_method(method, state, device)
    if position["done"]:
        set_rng_state(state["rng"])
        return position["task"] + 1, None
    return position["task"], {"stage": position["stage"], "epoch": position["epoch"],
                              "optimizer": state["optimizer"], "scheduler": state["scheduler"], "rng": state["rng"]}
