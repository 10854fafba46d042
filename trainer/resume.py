"""Continuing a run from its checkpoints: which config a run folder holds, whether it is finished, which checkpoint
a resume continues from, how a method is rebuilt to the state a checkpoint recorded, and the checks on the way.

A checkpoint is trusted for nothing it was not checked for: it must have been written by this run (its config
equals the run's config.yaml apart from the runtime keys, its seed and position fit the run), and its state must
fit the method as rebuilt (the same keys, every tensor of the same shape and finite, class means one row per
seen class of the network's feature width, exemplars inside the train pool). Anything else is a one-line error
naming the file and the first mismatching key.

A method is restored by replaying `before_task` for every task the checkpoint reached (which rebuilds its
structure: heads, adapters, branches, frozen copies), then loading its state_dict and extra state. Inside a
task, the engine is handed the position (stage name, epochs done, optimiser, scheduler, RNG) to continue from.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch

from utils import checkpoint
from utils.checkpoint import UnreadableCheckpoint, rng_state, set_rng_state
from utils.config import RUNTIME_KEYS, load_config
from utils.memory import ExemplarMemory
from utils.registry import UserError


def saved_config(run_dir: str, config_path: str | None, cli: dict, method_keys):
    """The config of the run in `run_dir`; command-line keys may only change where it runs, and a --config given
    beside it must resolve to the same config."""
    if not os.path.exists(run_dir):
        raise UserError(f"--checkpoint_dir '{run_dir}' does not exist")
    if not os.path.isdir(run_dir):
        raise UserError(f"--checkpoint_dir '{run_dir}' is a file, not a run folder")
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


def read_results(run_dir: str) -> dict | None:
    """results.json of the run (None when there is none yet), checked to be what this framework writes."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        runs = content["runs"]
        if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("seed"), int)
                                                 and isinstance(r.get("tasks"), list) for r in runs):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"'{path}' is corrupt; remove it to resume from the checkpoints") from None
    return content


def is_finished(run_dir: str, cfg) -> bool:
    content = read_results(run_dir)
    if content is None:
        return False
    return {r["seed"] for r in content["runs"] if r.get("complete")} >= set(cfg.seed)


def without_runtime(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def _fail(path: str, problem: str):
    raise UserError(f"checkpoint '{path}' {problem}")


def read_checkpoint(path: str, cfg, run_dir: str, seed: int | None = None, n_tasks: int | None = None,
                    task: int | None = None) -> dict:
    """A checkpoint of this run: written with the run's config (apart from the runtime keys), for `seed`, at a
    position inside the run's `n_tasks` tasks (with `task`: the end of that task), with a well-formed record and
    RNG state. An unreadable file raises `UnreadableCheckpoint` (a resume may fall back to an older one)."""
    state = checkpoint.load(path)
    saved, ours = state["config"], without_runtime(cfg.to_dict())
    if not isinstance(saved, dict):
        _fail(path, "holds no config")
    saved = without_runtime(saved)
    diff = [k for k in ours if k not in saved or saved[k] != ours[k]] + [k for k in saved if k not in ours]
    if diff:
        k = diff[0]
        _fail(path, f"was written with another config than {os.path.join(run_dir, 'config.yaml')}: '{k}' is "
                    f"{saved.get(k, '(absent)')!r} in the checkpoint and {ours.get(k, '(absent)')!r} in the run")
    if seed is not None and state["seed"] != seed:
        _fail(path, f"belongs to seed {state['seed']!r}, not seed {seed}")
    where = state["position"]
    if not (isinstance(where, dict) and isinstance(where.get("task"), int) and isinstance(where.get("done"), bool)):
        _fail(path, "holds no valid position (task, done)")
    if n_tasks is not None and not 0 <= where["task"] < n_tasks:
        _fail(path, f"is at task {where['task']}, but the run has tasks 0..{n_tasks - 1}")
    if task is not None and (where["task"], where["done"]) != (task, True):
        _fail(path, f"holds the position {where} instead of the end of task {task}")
    if not where["done"]:
        if not (isinstance(where.get("stage"), str) and isinstance(where.get("epoch"), int) and where["epoch"] >= 1):
            _fail(path, "is inside a task but names no stage and epoch")
        if not isinstance(state.get("optimizer"), dict) or "scheduler" not in state:
            _fail(path, "is inside a task but holds no optimizer and scheduler state")
    record = state["record"]
    done_tasks = where["task"] + 1 if where["done"] else where["task"]
    if not (isinstance(record, dict) and record.get("seed") == state["seed"] and isinstance(record.get("tasks"), list)
            and len(record["tasks"]) == done_tasks and isinstance(record.get("class_order"), list)):
        _fail(path, f"holds a record that does not match its position (expected {done_tasks} finished tasks)")
    _check_rng(path, state["rng"])
    if not isinstance(state["method"], dict) or not isinstance(state["extra"], dict):
        _fail(path, "holds no method state")
    state["path"] = path
    return state


def _check_rng(path: str, rng) -> None:
    """Setting the RNG state is the check (then the current state is put back)."""
    current = rng_state()
    try:
        set_rng_state(rng)
    except Exception:  # noqa: BLE001 - whatever a malformed state makes random/numpy/torch raise
        _fail(path, "holds a malformed RNG state")
    finally:
        set_rng_state(current)


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
            return read_checkpoint(latest, cfg, run_dir, seed, n_tasks), None
        except UnreadableCheckpoint:
            unreadable.append(latest)
    for task in reversed(range(n_tasks)):
        path = checkpoint.task_path(run_dir, seed, task)
        if os.path.exists(path):
            try:
                state = read_checkpoint(path, cfg, run_dir, seed, n_tasks, task=task)
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


def check_state(method, state: dict, path: str, task) -> None:
    """The checkpoint's state must fit `method` as rebuilt up to `task` (the checkpoint's position): the same keys,
    tensors of the same shapes, finite, class means of one row per class seen by then and the network's feature
    width, and exemplars that are positions of the train pool."""
    own, given = method.state_dict(), state["method"]
    missing = [k for k in own if k not in given]
    if missing:
        _fail(path, f"does not fit {method.cfg.method}'s network: it lacks '{missing[0]}' (another method or "
                    "architecture?)")
    extra = [k for k in given if k not in own]
    if extra:
        _fail(path, f"does not fit {method.cfg.method}'s network: it has the unexpected key '{extra[0]}' (another "
                    "method or architecture?)")
    done = state["position"]["done"]
    seen = task.total if done else task.known
    for name, mine in own.items():
        value = given[name]
        if not isinstance(value, torch.Tensor):
            _fail(path, f"holds a {type(value).__name__} under '{name}' instead of a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            _fail(path, f"holds non-finite values in '{name}'")
        if name == "class_means":
            _check_class_means(method, value, path, seen)
        elif value.shape != mine.shape:
            _fail(path, f"does not fit {method.cfg.method}'s network: '{name}' has shape {tuple(value.shape)}, the "
                        f"network's is {tuple(mine.shape)}")
    extra_state, own_extra = state["extra"], method.extra_state()
    for name in own_extra:
        if name not in extra_state:
            _fail(path, f"lacks the extra state '{name}'")
    for name in extra_state:
        if name not in own_extra:
            _fail(path, f"has the unexpected extra state '{name}'")
    memory = extra_state.get("memory")
    if isinstance(method.memory, ExemplarMemory) and memory is not None:
        _check_exemplars(memory, path, seen, len(method.data.train_y))


def _check_class_means(method, means: torch.Tensor, path: str, seen: int) -> None:
    if not method.cfg.apply_nme or means.numel() == 0:
        if means.numel():
            _fail(path, "holds class_means, which this run (apply_nme: false) never computes")
        return
    if means.dim() != 2 or means.shape[0] != seen:
        _fail(path, f"'class_means' has shape {tuple(means.shape)}; it must have one row per seen class ({seen})")
    width = _feature_width(method)
    if means.shape[1] != width:
        _fail(path, f"'class_means' has shape {tuple(means.shape)}; its rows must have the network's {width} "
                    "features")


@torch.no_grad()
def _feature_width(method) -> int:
    """The width of `network(x)["features"]`, from one blank image (eval mode; no RNG is drawn)."""
    network = method.network
    modes = [(m, m.training) for m in network.modules()]
    network.eval()
    try:
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        x = torch.zeros(1, 3, method.data.img_size, method.data.img_size, device=device)
        return int(network(x)["features"].shape[1])
    finally:
        for m, mode in modes:
            m.training = mode


def _check_exemplars(memory, path: str, seen: int, pool: int) -> None:
    exemplars = memory.get("exemplars") if isinstance(memory, dict) else None
    if not isinstance(exemplars, dict):
        _fail(path, "holds a memory without exemplars")
    for c, positions in exemplars.items():
        if not isinstance(c, (int, np.integer)) or not 0 <= int(c) < seen:
            _fail(path, f"holds exemplars of class {c!r}, but only classes 0..{seen - 1} are seen by then")
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.is_floating_point() \
                or positions.dtype == torch.bool:
            _fail(path, f"holds exemplars of class {c} that are not a list of train-pool positions")
        if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= pool):
            _fail(path, f"holds exemplars of class {c} outside the train pool (0..{pool - 1})")


def _check_optimizer(method, optimizer: dict, path: str) -> None:
    """The optimiser state of a checkpoint inside a stage: at most as many parameters as the method has, and
    every per-parameter tensor (momentum, Adam moments) of the shape of one of the method's parameters."""
    groups, per_param = optimizer.get("param_groups"), optimizer.get("state")
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
            and isinstance(per_param, dict)):
        _fail(path, "holds a malformed optimizer state")
    shapes = {tuple(p.shape) for p in method.parameters()}
    if sum(len(g["params"]) for g in groups) > len(list(method.parameters())):
        _fail(path, "holds an optimizer state for more parameters than the method has")
    for index, entry in per_param.items():
        if not isinstance(entry, dict):
            _fail(path, f"holds a malformed optimizer state for parameter {index}")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) not in shapes:
                _fail(path, f"holds an optimizer state ('{name}' of parameter {index}) that fits none of the "
                            "method's parameters")


def load_method(method, state: dict, device: torch.device, path: str, task) -> None:
    """Check the checkpoint's state against the rebuilt method (see `check_state`), then load it."""
    method.to(device)
    check_state(method, state, path, task)
    method.load_state_dict(state["method"])
    method.load_extra_state(state["extra"])


def restore(method, data, state: dict, device: torch.device, path: str) -> tuple[int, dict | None]:
    """Rebuild the method's structure up to the checkpoint's task and load its state. Returns the task to run
    next and, for a checkpoint taken inside that task, the position the engine continues from."""
    position = state["position"]
    for task in data.tasks[: position["task"] + 1]:
        method.task = task
        method.before_task(task)
    load_method(method, state, device, path, data.tasks[position["task"]])
    if not position["done"]:
        _check_optimizer(method, state["optimizer"], path)
    if position["done"]:
        set_rng_state(state["rng"])
        return position["task"] + 1, None
    return position["task"], {"stage": position["stage"], "epoch": position["epoch"],
                              "optimizer": state["optimizer"], "scheduler": state["scheduler"], "rng": state["rng"]}
