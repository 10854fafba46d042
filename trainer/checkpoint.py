"""Checkpoints: everything needed to continue a run exactly, as plain tensors, numbers, lists and dicts.

A checkpoint holds the method's state_dict and extra state (memory bank, old/frozen networks are submodules),
the position (task; and inside a task the training stage and epoch, with the optimiser and scheduler state),
the RNG states (python, numpy, torch, CUDA), the resolved config and the metrics so far. Files are written to a
temporary file of a unique name beside them, flushed to disk (fsync) and renamed, so a killed run, a full disk
or a second process never leaves a half-written or mixed checkpoint, and the previous file stays until the new
one is complete; they are read with `map_location` and `weights_only=True`, so loading one cannot run code.
`atomic_write` writes a file whole and `open_regular` opens one written in place (the run's lock and log): neither
follows a link planted in a run folder; the temporary files a kill leaves are removed at the next start
(`remove_temporaries`).

Files, in `<run folder>/checkpoints/`: `seed<S>_latest.pt` (rewritten after every task and every
`checkpoint_every` epochs) and, with `save_models: true`, `seed<S>_task<T>.pt` after each task.

`content` is what a checkpoint holds (written by trainer/hooks.py's CheckpointHook) and `read` its reader: a
checkpoint is trusted for nothing it was not checked for. It must have been written by this run (its config
equals the run's config.yaml apart from the runtime keys, its seed and position fit the run, its record and RNG
state are well formed); whether its state fits the method is checked by the method itself
(`Method.load_checkpoint_state`). Anything else is a one-line error naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import re
import signal
import stat
import tempfile
import threading
from typing import Callable

import numpy as np
import torch

from trainer.seed import rng_state, set_rng_state

from utils.config import RUNTIME_KEYS
from utils.registry import UserError
from utils.safe_pickle import check_structure

VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
# what `atomic_write` names its temporary files: .<file name>.<tempfile.mkstemp's random letters>.tmp
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]+\.tmp")
_NOFOLLOW, _NONBLOCK = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_NONBLOCK", 0)  # POSIX only


def atomic_write(path: str, write: Callable, what: str = "file", binary: bool = True) -> None:
    """Write `path` all or nothing: `write(f)` fills a temporary file of a unique name in the same folder, which
    is fsynced and renamed over `path`. On any failure (a full disk, a read-only folder) the temporary file is
    removed, `path` keeps its previous content, and the error is a one-line `UserError` naming the file.

    Nothing here follows a link planted at `path`: the temporary file is created new (mkstemp: O_CREAT|O_EXCL) and
    the rename replaces a link at `path` instead of writing through it. A temporary file a kill left behind is
    removed at the next start of the run (`remove_temporaries`)."""
    folder = os.path.dirname(path) or "."
    tmp = None
    with signals_deferred():  # Ctrl-C or SIGTERM in the middle of a write would leave it failed, not interrupted
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
            os.chmod(tmp, 0o666 & ~_UMASK)  # the permissions open() would give, not mkstemp's private 0600
            with os.fdopen(fd, "wb" if binary else "w") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            _fsync_folder(folder)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            reason = _reason(err)
            raise UserError(f"cannot write {what} '{path}': {reason}; its previous version (if any) is kept"
                            + ("; free some disk space and resume the run" if "space" in reason or "full" in reason
                               else "")) from None
        finally:
            if tmp is not None:
                try:
                    os.remove(tmp)
                except OSError:
                    pass


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends (their handlers then run), so a
    write is finished, not broken into a failed write. Only in the main thread, where Python runs handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught, previous = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in caught[:1]:
            signal.raise_signal(sig)


def remove_temporaries(folder: str) -> list[str]:
    """Remove the temporary files a kill between the steps of `atomic_write` left in `folder` (the names of
    `TEMPORARY` only; regular files, and links of such a name, which unlink removes without following); returns
    their names. Call it only under the run folder's lock, so that no live writer's temporary file is removed. A
    `folder` that is a link is not entered: nothing outside the run folder is touched."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _NONBLOCK)
    except OSError:  # none yet, a link or not a folder: nothing of ours in it
        return []
    removed = []
    try:
        for entry in os.scandir(fd):
            if TEMPORARY.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
                try:
                    os.unlink(entry.name, dir_fd=fd)
                    removed.append(entry.name)
                except FileNotFoundError:
                    pass
    finally:
        os.close(fd)
    return removed


def open_regular(path: str, flags: int, what: str, mode: int = 0o666) -> int:
    """Open (creating it) a file of a run folder that is written in place, its lock or its log, without following
    a link: a symbolic link planted there (a run folder is shared and copied) would make the run write over the
    file it points to, a hard link would change another name's content, and a FIFO would block the open. O_NOFOLLOW
    refuses the link, O_NONBLOCK keeps the open of a FIFO from waiting, fstat refuses whatever was opened that is
    not a regular file of one name. Returns the file descriptor (blocking); anything else is a one-line
    `UserError` naming the file."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK, mode)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
            try:
                _refuse_non_regular(path, what, os.lstat(path))
            except OSError:
                pass
        raise UserError(f"cannot open the run's {what} '{path}': {err.strerror or err}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        _refuse_non_regular(path, what, info)
    if _NONBLOCK:
        os.set_blocking(fd, True)
    return fd


def _refuse_non_regular(path: str, what: str, info: os.stat_result) -> None:
    """The one-line refusal of a file `open_regular` must not write in place (nothing for a plain file)."""
    why = ""
    if stat.S_ISLNK(info.st_mode):
        kind, why = "a symbolic link", ": the run would write over the file it points to"
    elif stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        kind, why = "a hard link", f": the run would change the file's {info.st_nlink - 1} other name(s) too"
    elif stat.S_ISREG(info.st_mode):
        return
    else:
        kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
                 stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}
        kind = next((k for test, k in kinds.items() if test(info.st_mode)), "something else")
    raise UserError(f"the run's {what} '{path}' is {kind}, not a plain file{why}; remove it and run again")


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(err: BaseException) -> str:
    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno is not None:
        return cause.strerror or os.strerror(cause.errno)
    text = str(err).strip().splitlines()
    if text and "write" in text[-1].lower():
        return f"the write failed ({text[-1][:160]}); is the disk full?"
    return text[-1][:200] if text else type(err).__name__


def save(path: str, data: dict) -> None:
    """Atomic, durable write (see `atomic_write`)."""
    atomic_write(path, lambda f: torch.save({"version": VERSION, **data}, f), "checkpoint")


def load(path: str) -> dict:
    if os.path.isdir(path):
        raise UserError(f"checkpoint '{path}' is a folder, not a checkpoint file")
    if not os.path.isfile(path):  # a FIFO would block the read forever
        raise UserError(f"checkpoint '{path}' is not a regular file; remove it")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the safe loader refused what the intact file asks for: never fall back
        raise UserError(f"checkpoint '{path}' is refused: {_refusal(err)}, which no checkpoint of this framework "
                        "holds (it may be crafted to run code); remove it or restore the original") from None
    except Exception as err:  # truncated (no zip directory, the pickle cut short), or not a checkpoint at all
        raise UnreadableCheckpoint(f"checkpoint '{path}' cannot be read ({type(err).__name__}); it is truncated, "
                                   "corrupt or not a checkpoint of this framework") from None
    why = check_structure(data, _EXPANDED_BYTES, _tensor_or_value)
    if why:  # weights-only pickles share references too: a 1 KB DAG would hang whatever walks the record
        raise UserError(f"checkpoint '{path}' is refused: it holds {why}, which no checkpoint of this framework "
                        "holds; remove it or restore the original")
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise UserError(f"checkpoint '{path}' is not a version-{VERSION} checkpoint of this framework")
    missing = [k for k in ("config", "seed", "position", "method", "extra", "rng", "record") if k not in data]
    if missing:
        raise UserError(f"checkpoint '{path}' lacks the key '{missing[0]}' every checkpoint of this framework holds")
    return data


#: the bytes of strings a checkpoint's lists and dicts may expand to (tensors count nothing: their storage is read)
_EXPANDED_BYTES = 1 << 30


def _tensor_or_value(obj) -> int:
    """What a non-container in a checkpoint stands for in `check_structure`: a string its length, the rest nothing
    (weights_only admits only tensors, numbers and a few torch types)."""
    return len(obj) if isinstance(obj, (str, bytes)) else 0


def _refusal(err: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused (a global, an opcode, a persistent id), in a few words."""
    text = " ".join(str(err).split())
    found = re.search(r"(?i)unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", text)
    if found:
        return f"it asks to load {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(.{1,80}?)(?:\s+Check the documentation|$)", text)
    return f"its pickle uses what the weights-only loader refuses ({found.group(1).rstrip('. ') if found else 'see --debug'})"


class UnreadableCheckpoint(UserError):
    """A checkpoint file that cannot be read at all (truncated, corrupt): a resume may fall back to an older one."""


def folder(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_path(run_dir: str, seed: int) -> str:
    return os.path.join(folder(run_dir), f"seed{seed}_latest.pt")


def task_path(run_dir: str, seed: int, task: int) -> str:
    return os.path.join(folder(run_dir), f"seed{seed}_task{task}.pt")


def content(cfg, seed: int, position: dict, method, record: dict, **extra) -> dict:
    """What a checkpoint holds: the config, the seed, the position ({task, done} and, inside a task, {stage,
    epoch} with `extra` optimizer and scheduler state), the method's state, the RNG states and the seed's record."""
    return {"config": cfg.to_dict(), "seed": seed, "position": position, "method": method.state_dict(),
            "extra": method.extra_state(), "rng": rng_state(), "record": record, **extra}


def digest(state: dict, extra: dict) -> str:
    """SHA-256 of a method's state_dict and extra state: what its predictions depend on. Recorded with each
    task's results (`weights_sha256`), so a re-test can tell whether the weights behind a checkpoint are the ones
    that produced them. Tensors count by name, dtype, shape and bytes; the extra state by its canonical repr."""
    h = hashlib.sha256()

    def feed(name: str, value) -> None:
        h.update(name.encode())
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            t = torch.empty(value.shape, dtype=value.dtype).copy_(value.detach())  # dense even when expanded
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                feed(f"{name}.{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(f"{name}[{i}]", v)
        else:
            h.update(repr(value).encode())

    feed("method", state)
    feed("extra", extra)
    return h.hexdigest()


def without_runtime(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def _fail(path: str, problem: str):
    raise UserError(f"checkpoint '{path}' {problem}")


def read(path: str, cfg, run_dir: str, seed: int | None = None, n_tasks: int | None = None,
         task: int | None = None) -> dict:
    """A checkpoint of this run: written with the run's config (apart from the runtime keys), for `seed`, at a
    position inside the run's `n_tasks` tasks (with `task`: the end of that task), with a well-formed record and
    RNG state. An unreadable file raises `UnreadableCheckpoint` (a resume may fall back to an older one)."""
    state = load(path)
    saved, ours = state["config"], without_runtime(cfg.to_dict())
    if not isinstance(saved, dict):
        _fail(path, "holds no config")
    saved = without_runtime(saved)
    # A key the checkpoint lacks was added to the framework after it was written; its default is what ran then.
    defaults = cfg.defaults()
    diff = [k for k in ours if saved.get(k, defaults[k]) != ours[k]] + [k for k in saved if k not in ours]
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
        scaler = state.get("scaler")
        if scaler is not None and not (isinstance(scaler, dict) and isinstance(scaler.get("scale"), float)):
            _fail(path, "holds a malformed gradient-scaler state")
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
