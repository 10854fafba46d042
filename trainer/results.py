"""What a run writes: its folder (`RunFolder`), config.yaml, results.json (written only by `ResultsFile`, read
back only by `read_results`), results.csv and plots, and the lock that keeps a second process out of a run
folder. results.json is rewritten atomically (a temporary file of a unique name, fsynced, renamed) after every
task, so an interrupted run keeps what it measured; its `summary` (mean and std over the finished seeds) is
written when the run ends."""
from __future__ import annotations

import datetime
import glob
import json
import logging
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None

import numpy as np
import yaml

from datasets import DATASETS
from datasets.scenario import task_sizes
from trainer import checkpoint, report
from trainer.checkpoint import atomic_write
from trainer.config_loader import check_folder_name
from trainer.log import close_logging, setup_logging
from trainer.metrics import format_mean_std, mean_std, summarize
from utils import distributed
from utils.registry import UserError

log = logging.getLogger("cl")
RUN_KEYS = ("last_acc", "avg_incremental_acc", "forgetting", "bwt", "last_cnn_acc", "last_nme_acc",
            "avg_incremental_nme_acc")


def run_folder(cfg, root: str = "logs") -> str:
    """logs/<method>/<dataset>/<backbone>_b<init>i<inc>/<note or timestamp>/, never an existing folder (claimed
    with mkdir, so two processes starting at once get two folders)."""
    spec = DATASETS.get(cfg.dataset)
    if spec.task_groups:
        split = f"tasks{len(spec.task_groups)}"
    else:
        split = "b{}i{}".format(*task_sizes(cfg, spec))
    for what, name in (("method", cfg.method), ("dataset", cfg.dataset), ("backbone", cfg.backbone)):
        check_folder_name(str(name), what)
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"--log_root '{root}' is a file, not a folder; give the folder run folders are created in")
    parent = os.path.join(root, cfg.method, cfg.dataset, f"{cfg.backbone}_{split}")
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    base = os.path.join(parent, cfg.note or stamp)
    try:
        os.makedirs(parent, exist_ok=True)
        for folder in [base, f"{base}_{stamp}", *(f"{base}_{stamp}~{i}" for i in range(1, 10000))]:
            try:
                os.mkdir(folder)
                return folder
            except FileExistsError:
                continue
    except OSError as err:
        raise UserError(f"cannot create a run folder under '{root}': {err.strerror or err}"
                        + (f" ('{err.filename}')" if err.filename else "")) from None
    raise UserError(f"cannot create a run folder under '{parent}': every name is taken")


class RunLock:
    """An exclusive lock on a run folder (`<run folder>/.lock`, fcntl.flock): a second process on the same folder
    gets a one-line error. The OS drops the lock when the process ends, however it ends, so a stale lock file of
    a killed run never blocks a resume. The lock file is truncated and given the pid, so it is opened without
    following a link (`checkpoint.open_regular`): a `.lock` planted as a link, a FIFO or a folder is refused."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.fd = None
        if fcntl is None:
            return
        self.fd = checkpoint.open_regular(self.path, os.O_RDWR | os.O_CREAT, "lock file", 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
            os.close(self.fd)
            self.fd = None
            raise UserError(f"run folder '{run_dir}' is in use by another process"
                            + (f" (pid {holder})" if holder.isdigit() else "") + "; wait until it ends") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def write_json(path: str, data) -> None:
    """Write JSON atomically: a temporary file of a unique name, fsynced, then a rename."""
    atomic_write(path, lambda f: json.dump(data, f, indent=1), "results file", binary=False)


def write_config(cfg, path: str) -> None:
    """The resolved config as a config file of our own schema (every key under basic:)."""
    atomic_write(path, lambda f: yaml.safe_dump({"basic": cfg.to_dict()}, f, sort_keys=False), "config file",
                 binary=False)


def add_task(record: dict, entry: dict) -> None:
    """Append a task's entry to a seed's record and recompute the run-level metrics from all entries."""
    record["tasks"].append(entry)
    tasks = record["tasks"]
    record.update(summarize([t["acc"] for t in tasks], [t["acc_per_task"] for t in tasks]))
    record["last_cnn_acc"] = tasks[-1]["cnn_acc"]
    nme = [t["nme_acc"] for t in tasks if t["nme_acc"] is not None]
    if nme:
        record["last_nme_acc"], record["avg_incremental_nme_acc"] = nme[-1], float(np.mean(nme))


def summary(runs: list[dict]) -> dict:
    """Mean and std over seeds of every run-level metric, the final cost and the training time."""
    if not runs:
        return {}
    out = {k: mean_std([r.get(k) for r in runs]) for k in RUN_KEYS if any(r.get(k) is not None for r in runs)}
    out["final_gflops"] = mean_std([r["tasks"][-1]["gflops"] for r in runs])
    out["final_params"] = mean_std([r["tasks"][-1]["params"] for r in runs])
    out["train_time_s"] = mean_std([sum(t.get("train_time_s", 0.0) for t in r["tasks"]) for r in runs])
    return out


class ResultsFile:
    """`<run folder>/<name>.json` (results, or results_retest): config, class order per seed, the seeds' records
    and, once the run is finished, the summary with results.csv and the plots beside it."""

    def __init__(self, run_dir: str, cfg, name: str = "results", runs: list[dict] | None = None):
        self.run_dir, self.cfg, self.name = run_dir, cfg, name
        self.path = os.path.join(run_dir, f"{name}.json")
        self.runs = list(runs or [])

    def write(self, current: dict | None = None) -> None:
        """The finished seeds' records, plus the record of the seed in progress (rank 0 writes)."""
        runs = self.runs + ([current] if current is not None else [])
        if distributed.is_main():
            write_json(self.path, self._content(runs, {}))

    def finish(self) -> dict:
        results = self._content(self.runs, summary([r for r in self.runs if r.get("complete")]))
        if not distributed.is_main():
            return results
        write_json(self.path, results)
        try:
            report.write_csv(results, os.path.join(self.run_dir, f"{self.name}.csv"))
            report.plot(results, self.run_dir, prefix="" if self.name == "results" else f"{self.name}_")
        except OSError as err:
            raise UserError(f"the results are in {self.path}, but the table and plots cannot be written: "
                            f"{err.strerror or err}" + (f" ('{err.filename}')" if err.filename else "")) from None
        s = results["summary"]
        log.info(f"done: last {self.cfg.eval_metric} {format_mean_std(s['last_acc'])}, average incremental "
                 f"{format_mean_std(s['avg_incremental_acc'])}, forgetting {s['forgetting']['mean']:.2f}, "
                 f"{s['final_gflops']['mean']:.4f} GFLOPs ({len(self.runs)} seed(s)); results in {self.path}")
        return results

    def _content(self, runs: list[dict], summary_: dict) -> dict:
        return {"config": self.cfg.to_dict(), "class_order": {str(r["seed"]): r["class_order"] for r in runs},
                "runs": runs, "summary": summary_}


def read_results(run_dir: str, name: str = "results") -> dict | None:
    """<run folder>/<name>.json (None when there is none yet), checked to be what `ResultsFile` writes: at most
    64 MiB (a run of a hundred tasks writes a few MB) and 32 levels deep (it writes 6; json.load and the pure-Python
    encoder that rewrites it recurse), with a list of runs. Anything else is one line naming the file."""
    path = os.path.join(run_dir, f"{name}.json")
    if not os.path.isfile(path):
        return None
    limit, depth = 64 * 2**20, 32
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise ValueError(f"larger than {limit // 2**20} MiB")
            try:
                content = json.load(f)
            except RecursionError:
                raise ValueError(f"nested deeper than {depth} levels") from None
        runs = content["runs"]
        if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("seed"), int)
                                                 and isinstance(r.get("tasks"), list) for r in runs):
            raise TypeError
        pending = [(content, 1)]  # no recursion: measured from the top down
        while pending:
            value, level = pending.pop()
            if level > depth:
                raise ValueError(f"nested deeper than {depth} levels")
            if isinstance(value, (dict, list)):
                pending.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    except (json.JSONDecodeError, UnicodeDecodeError):
        why = "not JSON"
    except ValueError as err:
        why = str(err).split(";")[0][:120]
    except (KeyError, TypeError):
        why = "no list of runs with their seed and tasks"
    except OSError as err:
        raise UserError(f"'{path}' cannot be read: {err.strerror or err}") from None
    else:
        return content
    raise UserError(f"'{path}' is corrupt ({why}); remove it to resume from the checkpoints")


def is_finished(run_dir: str, cfg) -> bool:
    """Whether every seed of the run in `run_dir` has a complete record."""
    content = read_results(run_dir)
    if content is None:
        return False
    return {r["seed"] for r in content["runs"] if r.get("complete")} >= set(cfg.seed)


def _check_own_folders(run_dir: str) -> None:
    """The folders a run creates files in (checkpoints/, tensorboard/ and its seed<S>/ folders, W&B's wandb/) must
    be folders of the run folder: one planted as a link would make the run write its files wherever it points."""
    board = os.path.join(run_dir, "tensorboard")
    seeds = glob.glob(os.path.join(glob.escape(board), "seed*"))
    for path in [os.path.join(run_dir, "checkpoints"), board, *seeds, os.path.join(run_dir, "wandb")]:
        if os.path.islink(path):
            raise UserError(f"'{path}' is a symbolic link, not a folder of the run (the run would write its files "
                            "where it points); remove it and run again")


class RunFolder:
    """The folder of a run and what lives as long as the run: its lock, its log and its results.json.

    A new run's folder is created only when `open` is first called, i.e. once the first seed to run is built
    and validated (config, dataset, backbone, method): nothing is written before. A resumed run's folder is
    locked at once, before results.json is read (another process may be rewriting it), and its config.yaml is
    never rewritten; once it is locked, the temporary files a killed writer left in it are removed and a link
    planted as its checkpoints/ or tensorboard/ folder is refused. Only rank 0 of a distributed run writes; every
    rank learns the folder's name."""

    def __init__(self, cfg, log_root: str = "logs", path: str | None = None):
        self.cfg, self.log_root, self.path = cfg, log_root, path
        self.resuming = path is not None
        self.lock = RunLock(path) if self.resuming and distributed.is_main() else None
        try:
            if self.lock is not None:
                _check_own_folders(path)
                for where in (path, checkpoint.folder(path)):  # under the lock: no live writer is making them
                    checkpoint.remove_temporaries(where)
            self.seen = read_results(path) if self.resuming else None  # what an earlier part of the run recorded
        except BaseException:  # no `with` block will release the lock of a folder that was refused
            if self.lock is not None:
                self.lock.release()
            raise
        self.results: ResultsFile | None = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        close_logging()
        if self.lock is not None:
            self.lock.release()

    def seeds_to_run(self) -> list[int]:
        """The run's seeds that have no complete record yet."""
        done = {r["seed"] for r in (self.seen or {}).get("runs", []) if r.get("complete")}
        return [s for s in self.cfg.seed if s not in done]

    def open(self, device) -> None:
        """Create (a new run) and lock the folder, write config.yaml, start run.log, and begin results.json with
        the seeds an earlier part of the run finished; nothing after the first call."""
        if self.results is not None:
            return
        main = distributed.is_main()
        if not self.resuming:
            self.path = distributed.broadcast(run_folder(self.cfg, self.log_root) if main else None)
            self.lock = RunLock(self.path) if main else None
            if main:
                write_config(self.cfg, os.path.join(self.path, "config.yaml"))
        setup_logging(os.path.join(self.path, "run.log"), quiet=not main)
        if main:
            os.makedirs(checkpoint.folder(self.path), exist_ok=True)
        self.results = ResultsFile(self.path, self.cfg, runs=[r for r in (self.seen or {}).get("runs", [])
                                                              if r.get("complete")])
        cfg = self.cfg
        log.info(f"run folder {self.path} | method {cfg.method}, dataset {cfg.dataset}, backbone {cfg.backbone}, "
                 f"device {device}" + (" | resuming" if self.resuming else ""))
