"""Continuing a run from its checkpoints: which config a run folder holds, which checkpoint a resume continues
from, and how a method is brought back to the state a checkpoint recorded. What a checkpoint must hold is checked
by its reader (trainer/checkpoint.py `read`), whether its state fits the method by the method
(`Method.load_checkpoint_state`), whether its optimiser state fits by the engine's optimiser module.

A method is restored by calling `begin_task` for every task the checkpoint reached (which rebuilds its structure:
heads, adapters, branches, frozen copies), then loading its state. Inside a task, the engine is handed the
position (stage name, epochs done, optimiser, scheduler, RNG) to continue from.
"""
from __future__ import annotations

import glob
import os

import torch

from trainer import checkpoint
from trainer.checkpoint import UnreadableCheckpoint
from trainer.config_loader import load_config
from trainer.engine.optim import optimizer_state_problem
from trainer.seed import set_rng_state
from utils.config import RUNTIME_KEYS
from utils.registry import InvalidState, UserError, shorten


def saved_config(run_dir: str, config_path: str | None, cli: dict, method_keys):
    """The config of the run in `run_dir`; command-line keys may only change where it runs, and a --config given
    beside it must resolve to the same config."""
    if not os.path.exists(run_dir):
        raise UserError(f"--checkpoint_dir '{run_dir}' does not exist")
    if not os.path.isdir(run_dir):
        raise UserError(f"--checkpoint_dir '{run_dir}' is a file, not a run folder; give the folder a run printed "
                        "when it started")
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        raise UserError(f"--checkpoint_dir '{run_dir}' is not a run folder (no config.yaml); give the folder a run "
                        "printed when it started")
    changed = sorted(set(cli) - set(RUNTIME_KEYS))
    if changed:
        key = changed[0] if len(changed[0]) <= 40 else shorten(changed[0], 40)
        raise UserError(f"--{key} cannot change when resuming or re-testing a run (only "
                        f"{', '.join(RUNTIME_KEYS)} can); start a new run instead")
    cfg = load_config(saved_path, cli, method_keys)
    if config_path:
        given = load_config(config_path, cli, method_keys).to_dict()
        diff = [k for k, v in cfg.to_dict().items() if k not in RUNTIME_KEYS and given.get(k) != v]
        if diff:
            raise UserError(f"--checkpoint_dir '{run_dir}' holds a run of another config: '{diff[0]}' is "
                            f"{shorten(cfg.to_dict()[diff[0]])} there and {shorten(given.get(diff[0]))} in "
                            f"{config_path}")
    return cfg


def resume_point(run_dir: str, cfg, seed: int, n_tasks: int, results: dict | None) -> tuple[dict | None, str | None]:
    """The checkpoint a resume of `seed` continues from, and a note for the log when it is not the latest one.

    `seed<S>_latest.pt`, or, when it is missing or unreadable (truncated by a full disk, say), the newest intact
    `seed<S>_task<T>.pt`. None when the seed left nothing behind (it starts from its first task). When the seed
    did leave something (a checkpoint, or tasks in results.json) but nothing to continue from, the resume stops:
    starting over would overwrite what the earlier part of the run wrote."""
    if os.path.exists(checkpoint.folder(run_dir)) and not os.path.isdir(checkpoint.folder(run_dir)):
        raise UserError(f"'{checkpoint.folder(run_dir)}' is a file; the run keeps its checkpoints in that folder")
    latest = checkpoint.latest_path(run_dir, seed)
    unreadable = []
    if os.path.exists(latest):
        try:
            return checkpoint.read(latest, cfg, run_dir, seed, n_tasks), None
        except UnreadableCheckpoint:
            unreadable.append(latest)
    for task in reversed(range(n_tasks)):
        path = checkpoint.task_path(run_dir, seed, task)
        if os.path.exists(path):
            try:
                state = checkpoint.read(path, cfg, run_dir, seed, n_tasks, task=task)
            except UnreadableCheckpoint:
                unreadable.append(path)
                continue
            why = "is unreadable" if unreadable else "is missing"
            return state, (f"seed {seed}: {os.path.basename(latest)} {why}; continuing from the newest intact "
                           f"checkpoint {os.path.basename(path)} (after task {task})")
    if unreadable:
        raise UserError(f"cannot resume seed {seed} of {run_dir}: '{unreadable[0]}' is unreadable (truncated?) and "
                        "no intact task checkpoint is left to continue from; start a new run")
    recorded = next((r for r in (results or {}).get("runs", []) if r.get("seed") == seed and r.get("tasks")), None)
    others = sorted(glob.glob(os.path.join(checkpoint.folder(run_dir), f"seed{seed}_*")))
    if recorded is not None or others:
        what = f"results.json holds {len(recorded['tasks'])} task(s) of it" if recorded else f"'{others[0]}' exists"
        raise UserError(f"cannot resume seed {seed} of {run_dir}: {os.path.basename(latest)} is missing and {what}, "
                        "but no checkpoint to continue from; starting over would overwrite them (start a new run)")
    return None, None


def load_method(method, state: dict, device: torch.device) -> None:
    """Load a checkpoint's state into `method`, rebuilt up to the checkpoint's task (the method checks it)."""
    position = state["position"]
    task = method.data.tasks[position["task"]]
    method.to(device)
    try:
        method.load_checkpoint_state(state["method"], state["extra"], task.total if position["done"] else task.known)
    except InvalidState as err:
        raise UserError(f"checkpoint '{state['path']}' {err}") from None


def restore(method, state: dict, device: torch.device) -> tuple[int, dict | None]:
    """Rebuild the method's structure up to the checkpoint's task and load its state. Returns the task to run
    next and, for a checkpoint taken inside that task, the position the engine continues from."""
    position = state["position"]
    for task in method.data.tasks[: position["task"] + 1]:
        method.begin_task(task)
    load_method(method, state, device)
    if position["done"]:
        set_rng_state(state["rng"])
        return position["task"] + 1, None
    problem = optimizer_state_problem(list(method.parameters()), state["optimizer"])
    if problem:
        raise UserError(f"checkpoint '{state['path']}' {problem}")
    return position["task"], {"stage": position["stage"], "epoch": position["epoch"], "optimizer": state["optimizer"],
                              "scheduler": state["scheduler"], "scaler": state.get("scaler"), "rng": state["rng"]}
