"""Hyper-parameter sweeps: python -m trainer.sweep SWEEP.yaml [--jobs N] [--launcher local|slurm] [--summary]

A sweep file names base configs, the points to try and the seeds of each point:

    configs: [options/finetune_il/digits.yaml, options/icarl/digits.yaml]
    grid: {lrate: [0.01, 0.05], memory_size: [100, 200]}   # the cartesian product; or
    # points: [{lrate: 0.01}, {lrate: 0.05, memory_size: 100}]
    seeds: [1, 2, 3]                 # default: each config's own seeds
    fixed: {epochs: 10}              # overrides every point gets (not part of the point's name)
    log_root: logs/sweeps/mine       # default: logs/sweeps/<sweep file stem>
    slurm: {partition: gpu, time_min: 240, gpus_per_node: 1, cpus_per_task: 8, array_parallelism: 16}

A config whose points or fixed overrides differ from the others' is a mapping in `configs` (its grid or points
replace the sweep's; its fixed are added to the sweep's), so one file holds a table of methods, each with its own
keys:

    configs:
      - options/icarl/digits.yaml                               # the sweep's grid and fixed
      - {config: options/bic/digits.yaml, grid: {epochs_bias: [20, 100]}}
      - {config: options/lwf/digits.yaml, points: [{}], fixed: {memory_size: 0}}   # {}: the config as it is

Each point (a config and its overrides) is one ordinary run of main.py with all its seeds, in a run folder named
after the point (`--note`: the sorted `key=value` pairs, the tail hashed past 200 bytes) under
`<log_root>/runs/<config>/`. Running the sweep again skips the points that finished (results.json with a summary
and every seed complete) and resumes the interrupted ones (`main.py --checkpoint_dir <folder>`), so a sweep that
crashed is finished by running it again and no run is trained twice. A point whose folder holds a run of other
settings (the fixed overrides changed) is refused instead of being mixed in.

Launchers: `local` runs `--jobs N` main.py processes at once, each on cores // N threads (OMP_NUM_THREADS,
MKL_NUM_THREADS: torch takes its thread count from them; the config has no thread key), each with its output in
`<log_root>/jobs/<config>/<note>.log`; SIGTERM or Ctrl-C to the sweep ends the runs (each keeps its last checkpoint:
run the sweep again to resume them) and starts no more. `slurm` submits one job array through submitit
(`<log_root>/submitit/` holds its scripts and logs) and waits for it. `local_submitit` is the same code path on
submitit's local executor, which the tests run. NOT run against a real cluster: the sbatch script submitit writes
from the `slurm:` block, the partition and GPU requests, array throttling, and how a job reaching its time limit
ends (main.py keeps its last checkpoint on SIGTERM, so running the sweep again resumes it; there is no automatic
requeue). `time_min` defaults to 60. A point whose run fails is named on stderr with where its output is, and the
exit status is 1; a bad sweep file is one line and exit status 2, before anything is written.

The summary (printed at the end, or alone with `--summary`) gives each point's mean ± sample std over seeds of the
last and average incremental accuracy and, when the runs recorded one (`val_split`), of the final validation
accuracy; per base config the best point by mean final validation accuracy, never by test accuracy (without
validation numbers it says so and picks nothing). It writes `<log_root>/summary.csv` (every point),
`<log_root>/best_<config>.yaml` (the chosen point's resolved config, loadable by main.py --config) and
`<log_root>/accuracy_vs_gflops.png`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import yaml

from trainer.config_loader import load_yaml, read_bounded
from trainer.metrics import format_mean_std, mean_std
from utils.registry import Terminated, UserError, shorten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("configs", "grid", "points", "seeds", "fixed", "log_root", "slurm")
ENTRY_KEYS = ("config", "grid", "points", "fixed")
SLURM_KEYS = {"partition": "slurm_partition", "time_min": "timeout_min", "gpus_per_node": "gpus_per_node",
              "cpus_per_task": "cpus_per_task", "array_parallelism": "slurm_array_parallelism"}
OWN_OPTIONS = ("config", "checkpoint_dir", "log_root", "seed", "note", "list", "debug", "strict", "help")
MAX_POINTS = 1000  # a grid multiplies: refuse a typo of 10 keys x 100 values before expanding it
MAX_NAME_BYTES = 200  # check_folder_name's bound on a note
LAUNCHERS = ("local", "slurm", "local_submitit")


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep: a base config, its overrides (the point) and what main.py is given for it."""
    config: str  # absolute path of the base config
    group: str  # the config's folder name under <log_root>/runs/
    overrides: dict  # the point's own keys (they name it)
    note: str
    cfg: object  # the resolved Config, with seeds and note
    runs_root: str  # main.py's --log_root for this point
    fixed: dict  # overrides the point gets without being named after them
    seeds: list | None  # None: the config's own

    def new_run_argv(self) -> list[str]:
        argv = ["--config", self.config]
        for key, value in {**self.fixed, **self.overrides}.items():
            argv += [f"--{key}", *_values(value)]
        if self.seeds:
            argv += ["--seed", *map(str, self.seeds)]
        return argv + ["--note", self.note, "--log_root", self.runs_root]

    def folder(self) -> str | None:
        """The run folder of this point, if an earlier invocation created it
        (<runs_root>/<method>/<dataset>/<backbone>_<split>/<note>)."""
        if not os.path.isdir(self.runs_root):
            return None
        for method in os.scandir(self.runs_root):
            for dataset in _subfolders(method.path):
                for split in _subfolders(dataset):
                    candidate = os.path.join(split, self.note)
                    if os.path.isdir(candidate):
                        return candidate
        return None


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str
    points: list[Point]
    log_root: str
    slurm: dict


def _subfolders(path: str) -> list[str]:
    return [e.path for e in os.scandir(path) if e.is_dir()] if os.path.isdir(path) else []


def _values(value) -> list[str]:
    """A value as main.py's command-line tokens (each read back as YAML there)."""
    items = value if isinstance(value, list) else [value]
    return [item if isinstance(item, str) else json.dumps(item) for item in items]


def slug(overrides: dict) -> str:
    """The point's folder name: sorted key=value pairs joined by '_', characters outside [A-Za-z0-9.=+-] as '-';
    past MAX_NAME_BYTES, the tail is replaced by a hash of the whole name (so long names stay distinct)."""
    if not overrides:
        return "default"
    text = "_".join(f"{k}={'-'.join(_values(v))}" for k, v in sorted(overrides.items()))
    text = re.sub(r"[^A-Za-z0-9.=+\-_]", "-", text)
    if len(text) > MAX_NAME_BYTES:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        text = f"{text[:MAX_NAME_BYTES - 17]}~{digest}"
    return text


def _read_sweep_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"sweep file '{path}' " + ("is not a regular file" if os.path.exists(path) else
                                                    "does not exist") + "; give a .yaml file")
    raw = read_bounded(path, "sweep file", "a sweep file is a few lines")
    try:
        data = load_yaml(raw.decode("utf-8"), path)
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(f"{path}: not a UTF-8 YAML file" + (f" (line {mark.line + 1})" if mark else "")) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with the keys {', '.join(KEYS)}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key {shorten(unknown[0])}; a sweep file has {', '.join(KEYS)}")
    return data


def _points(spec: dict, where: str) -> list[dict]:
    """The points of `spec` (a sweep file or one of its config entries): its 'grid' expanded, or its 'points'."""
    if ("grid" in spec) == ("points" in spec):
        raise UserError(f"{where}: give either 'grid' (key: [values]) or 'points' (a list of mappings), not "
                        + ("both" if "grid" in spec else "neither"))
    if "grid" in spec:
        grid = spec["grid"]
        if not isinstance(grid, dict) or not grid:
            raise UserError(f"{where}: 'grid' is empty; give key: [values, ...] pairs")
        count = 1
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"{where}: grid key {shorten(key)} needs a non-empty list of values")
            count *= len(values)
            if count > MAX_POINTS:
                raise UserError(f"{where}: the grid has more than {MAX_POINTS} points; split the sweep")
        points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    else:
        points = spec["points"]
        if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
            raise UserError(f"{where}: 'points' must be a non-empty list of key: value mappings")
        if len(points) > MAX_POINTS:
            raise UserError(f"{where}: more than {MAX_POINTS} points; split the sweep")
    return points


def _fixed(spec: dict, where: str) -> dict:
    fixed = spec.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{where}: 'fixed' must be a mapping of key: value")
    return fixed


def _entries(data: dict, path: str) -> list[tuple[str, list[dict], dict]]:
    """(config file, its points, its fixed overrides) per entry of 'configs': a path takes the sweep's grid or
    points and fixed; a mapping {config, grid | points, fixed} takes its own points (or the sweep's) and adds its
    fixed to the sweep's."""
    configs = data.get("configs")
    if not isinstance(configs, list) or not configs or len(configs) > MAX_POINTS:
        raise UserError(f"{path}: 'configs' must be a non-empty list of config files")
    shared = _points(data, path) if "grid" in data or "points" in data else None
    fixed = _fixed(data, path)
    out = []
    for entry in configs:
        if isinstance(entry, str) and entry:
            entry = {"config": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), str) or not entry["config"]:
            raise UserError(f"{path}: each of 'configs' is a config file or a mapping with 'config' (a file) and "
                            "optionally 'grid' or 'points' and 'fixed'")
        where = f"{path}: {shorten(entry['config'])}"
        unknown = [k for k in entry if k not in ENTRY_KEYS]
        if unknown:
            raise UserError(f"{where}: unknown key {shorten(unknown[0])}; a config entry has "
                            f"{', '.join(ENTRY_KEYS)}")
        if "grid" in entry or "points" in entry:
            points = _points(entry, where)
        elif shared is None:
            raise UserError(f"{where}: no points; give the sweep or this entry a 'grid' or 'points'")
        else:
            points = shared
        out.append((entry["config"], points, {**fixed, **_fixed(entry, where)}))
    if sum(len(points) for _, points, _ in out) > MAX_POINTS:
        raise UserError(f"{path}: more than {MAX_POINTS} points; split the sweep")
    return out


def load_sweep(path: str) -> Sweep:
    """The sweep file, checked and expanded into points; every point's config is resolved (main.py's own
    loader), so a bad key, value or config file is a one-line error naming the sweep file before anything runs."""
    from methods import method_config
    from trainer.cli import parse

    from trainer.config_loader import load_config

    data = _read_sweep_file(path)
    entries = _entries(data, path)
    for _, points, fixed in entries:
        for key in [*fixed, *(k for p in points for k in p)]:
            if not isinstance(key, str) or key in OWN_OPTIONS:
                raise UserError(f"{path}: {shorten(key)} cannot be swept or fixed" + (
                    " (give seeds as 'seeds', the folder as 'log_root')" if key in OWN_OPTIONS else ""))
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise UserError(f"{path}: 'seeds' must be a non-empty list of integers")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict) or any(k not in SLURM_KEYS for k in slurm):
        raise UserError(f"{path}: 'slurm' takes the keys {', '.join(SLURM_KEYS)}")
    stem = os.path.splitext(os.path.basename(path))[0]
    log_root = data.get("log_root", os.path.join("logs", "sweeps", stem))
    if not isinstance(log_root, str) or not log_root:
        raise UserError(f"{path}: 'log_root' must be a folder path")
    log_root = os.path.abspath(log_root)

    groups: dict[str, str] = {}
    out, seen = [], {}
    for config, points, fixed in entries:
        config = os.path.abspath(config)
        group = re.sub(r"[^A-Za-z0-9.+\-_]", "-",
                       f"{os.path.basename(os.path.dirname(config))}_{os.path.splitext(os.path.basename(config))[0]}")
        if groups.setdefault(group, config) != config:
            raise UserError(f"{path}: configs '{groups[group]}' and '{config}' would share the folder '{group}'; "
                            "give them distinct folder/file names")
        for overrides in points:
            note = slug(overrides)
            if (group, note) in seen:
                raise UserError(f"{path}: point {shorten(overrides)} repeats point {shorten(seen[group, note])}")
            seen[group, note] = overrides
            point = Point(config, group, dict(overrides), note, None, os.path.join(log_root, "runs", group),
                          fixed, seeds)
            try:
                args = parse(point.new_run_argv())
                cfg = load_config(args.config, args.overrides, method_config)
            except UserError as err:
                raise UserError(f"{path}: point {shorten(overrides)} of {config}: {err}") from None
            out.append(dataclasses.replace(point, cfg=cfg))
    return Sweep(path, out, log_root, slurm)


# ---- the state of a point ---------------------------------------------------------------------------------------

def state(point: Point) -> tuple[str, str | None]:
    """('finished' | 'interrupted' | 'new', run folder). A folder holding a run of other settings is refused."""
    from trainer.results import is_finished, read_results

    folder = point.folder()
    if folder is None:
        return "new", None
    results = read_results(folder)
    if results is not None:
        saved = dict(results.get("config") or {})
        wanted = point.cfg.to_dict()
        diff = [k for k in wanted if k != "device" and saved.get(k) != wanted[k]]
        if diff:
            raise UserError(f"'{folder}' holds a run with {diff[0]}={shorten(saved.get(diff[0]))}, the sweep asks "
                            f"for {shorten(wanted[diff[0]])}; give the sweep another log_root or remove the folder")
        if results.get("summary") and is_finished(folder, point.cfg):
            return "finished", folder
    return "interrupted", folder


def command(point: Point, sweep: Sweep) -> list[str] | None:
    """main.py's arguments for the point: a new run, a resume of its folder, or None when it is finished."""
    what, folder = state(point)
    if what == "finished":
        return None
    if what == "interrupted":
        return ["--checkpoint_dir", folder]
    return point.new_run_argv()


# ---- launchers --------------------------------------------------------------------------------------------------

def _command(argv: list[str], threads: int | None) -> tuple[list[str], dict]:
    """`python main.py argv` and its environment, on `threads` threads."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return [sys.executable, os.path.join(ROOT, "main.py"), *argv], env


class Children:
    """The main.py processes of a local sweep, each in a session of its own. SIGTERM or Ctrl-C to the sweep (what
    `stop` handles) is passed on as one SIGTERM to every running process, which ends it keeping its last
    checkpoint, and no further process is started: running the sweep again resumes them."""

    def __init__(self):
        self.lock, self.running, self.stopped = threading.Lock(), set(), None

    def run(self, cmd: list[str], log_path: str, **kwargs) -> int | None:
        """`cmd` with its output appended to `log_path`; its exit status, None if the sweep is stopping."""
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            with self.lock:
                if self.stopped is not None:
                    return None
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        **kwargs)
                self.running.add(proc)
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.running.discard(proc)

    def stop(self, signum, frame) -> None:
        with self.lock:
            if self.stopped is None:
                self.stopped = signum
                for proc in self.running:
                    proc.send_signal(signal.SIGTERM)

    @contextlib.contextmanager
    def signals(self):
        """`stop` handles SIGTERM and SIGINT while the block runs (from the main thread: where Python runs
        handlers); after it, `Terminated` (SIGTERM) or KeyboardInterrupt (Ctrl-C) if one came."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stopped is not None:
            raise Terminated if self.stopped == signal.SIGTERM else KeyboardInterrupt


def run_point(argv: list[str], cwd: str, threads: int | None) -> int:
    """A submitit job: one main.py run (its output goes to the job's log); a failure fails the job."""
    cmd, env = _command(argv, threads)
    code = subprocess.run(cmd, cwd=cwd, env=env).returncode
    if code != 0:
        raise RuntimeError(f"main.py {' '.join(argv)} exited with status {code}")
    return code


def launch_local(todo: list[tuple[Point, list[str]]], sweep: Sweep, jobs: int) -> dict[str, str]:
    """`jobs` main.py processes at once, each on its share of the cores; returns failed points -> log file.
    SIGTERM or Ctrl-C ends the running ones (keeping their checkpoints) and raises Terminated / KeyboardInterrupt."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // jobs)
    cwd = os.getcwd()
    children = Children()

    def one(item):
        point, argv = item
        log_path = os.path.join(sweep.log_root, "jobs", point.group, f"{point.note}.log")
        cmd, env = _command(argv, threads)
        return point, log_path, children.run(cmd, log_path, cwd=cwd, env=env)

    with children.signals(), ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(one, todo))
    return {f"{p.group}/{p.note}": log for p, log, code in done if code != 0}


def launch_submitit(todo: list[tuple[Point, list[str]]], sweep: Sweep, cluster: str | None) -> dict[str, str]:
    """One job array through submitit (cluster None: slurm, as AutoExecutor detects it; "local": submitit's local
    executor); waits for every job. Returns failed points -> the job's log folder."""
    import submitit

    folder = os.path.join(sweep.log_root, "submitit")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = {SLURM_KEYS[k]: v for k, v in sweep.slurm.items()}
    params.setdefault("timeout_min", 60)
    executor.update_parameters(**params)
    cpus = sweep.slurm.get("cpus_per_task")
    cwd = os.getcwd()
    jobs = executor.map_array(run_point, [argv for _, argv in todo], [cwd] * len(todo), [cpus] * len(todo))
    failed = {}
    for (point, _), job in zip(todo, jobs):
        try:
            job.result()
        except Exception:  # the job's own log holds the error
            failed[f"{point.group}/{point.note}"] = folder
    return failed


def run_sweep(sweep: Sweep, launcher: str = "local", jobs: int = 1) -> dict[str, str]:
    """Run every point that is not finished; returns the failed ones (point -> where its output is)."""
    todo = [(p, argv) for p in sweep.points if (argv := command(p, sweep)) is not None]
    print(f"sweep {sweep.path}: {len(sweep.points)} points, {len(sweep.points) - len(todo)} finished, "
          f"{len(todo)} to run")
    if not todo:
        return {}
    if launcher == "local":
        return launch_local(todo, sweep, jobs)
    return launch_submitit(todo, sweep, "local" if launcher == "local_submitit" else None)


# ---- the summary ------------------------------------------------------------------------------------------------

def point_row(point: Point) -> dict:
    """A point's numbers over its complete seeds: last and average incremental accuracy, final validation accuracy
    (None unless every complete seed recorded one), final GFLOPs."""
    from trainer.results import read_results

    what, folder = state(point)
    results = read_results(folder) if folder else None
    runs = [r for r in (results or {}).get("runs", []) if r.get("complete")]
    vals = [r["tasks"][-1].get("val_acc") if r["tasks"] else None for r in runs]
    return {"config": point.config, "point": point.note, "overrides": point.overrides, "state": what,
            "folder": folder, "seeds": len(runs),
            "last_acc": mean_std([r.get("last_acc") for r in runs]),
            "avg_incremental_acc": mean_std([r.get("avg_incremental_acc") for r in runs]),
            "val_acc": mean_std(vals) if runs and all(v is not None for v in vals) else mean_std([]),
            "final_gflops": mean_std([r["tasks"][-1].get("gflops") for r in runs if r["tasks"]])}


def best_points(rows: list[dict]) -> dict[str, dict | str]:
    """Per base config, the finished point of highest mean final validation accuracy; a reason (str) where none
    can be chosen. Test accuracy never chooses: it would report a number tuned on the test set."""
    best: dict[str, dict | str] = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        done = [r for r in rows if r["config"] == config and r["state"] == "finished"]
        lacking = [r for r in done if r["val_acc"]["mean"] is None]
        if not done:
            best[config] = "no point has finished"
        elif lacking:
            best[config] = (f"the best point cannot be chosen without validation numbers ({len(lacking)} of "
                            f"{len(done)} finished points recorded no val_acc; run with val_split > 0); test "
                            "accuracy is never used to choose")
        else:
            best[config] = max(done, key=lambda r: r["val_acc"]["mean"])
    return best


def summarize_sweep(sweep: Sweep) -> tuple[list[dict], dict]:
    """Print the table of points and the best point per config; write summary.csv, best_<config>.yaml and the
    accuracy-vs-GFLOPs figure under the sweep's log_root. Returns (rows, best)."""
    from trainer.results import read_results

    rows = [point_row(p) for p in sweep.points]
    best = best_points(rows)
    os.makedirs(sweep.log_root, exist_ok=True)
    fields = ("last_acc", "avg_incremental_acc", "val_acc", "final_gflops")
    with open(os.path.join(sweep.log_root, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "point", "overrides", "state", "seeds", "folder"]
                        + [f"{k}_{s}" for k in fields for s in ("mean", "std")])
        for r in rows:
            writer.writerow([r["config"], r["point"], json.dumps(r["overrides"], sort_keys=True), r["state"],
                             r["seeds"], r["folder"] or ""] + [r[k][s] for k in fields for s in ("mean", "std")])
    print(f"{'point':<40} {'state':<12} {'last acc':>14} {'avg inc acc':>14} {'val acc':>14}  config")
    for r in rows:
        print(f"{r['point'][:40]:<40} {r['state']:<12} {format_mean_std(r['last_acc']):>14} "
              f"{format_mean_std(r['avg_incremental_acc']):>14} {format_mean_std(r['val_acc']):>14}  {r['config']}")
    for point in sweep.points:
        chosen = best[point.config]
        if not isinstance(chosen, dict) or chosen["point"] != point.note:
            continue
        config = dict(read_results(chosen["folder"])["config"], note=None)
        target = os.path.join(sweep.log_root, f"best_{point.group}.yaml")
        with open(target, "w") as f:
            f.write(f"# best point of sweep {sweep.path} by mean final val_acc: base config {point.config}\n"
                    f"# with {json.dumps(point.overrides, sort_keys=True)}; every key resolved under basic:\n")
            yaml.safe_dump({"basic": config}, f, sort_keys=False)
    for config, chosen in best.items():
        if isinstance(chosen, dict):
            print(f"best for {config}: {chosen['point']} (val acc {format_mean_std(chosen['val_acc'])}; test: "
                  f"last {format_mean_std(chosen['last_acc'])}, average incremental "
                  f"{format_mean_std(chosen['avg_incremental_acc'])})")
        else:
            print(f"best for {config}: none; {chosen}")
    _plot(rows, os.path.join(sweep.log_root, "accuracy_vs_gflops.png"))
    return rows, best


def _plot(rows: list[dict], path: str) -> None:
    """Last test accuracy against final GFLOPs, one marker per finished point."""
    done = [r for r in rows if r["last_acc"]["mean"] is not None and r["final_gflops"]["mean"] is not None]
    if not done:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for config in dict.fromkeys(r["config"] for r in done):
        mine = [r for r in done if r["config"] == config]
        ax.scatter([r["final_gflops"]["mean"] for r in mine], [r["last_acc"]["mean"] for r in mine],
                   label=os.path.relpath(config))
    ax.set_xlabel("final GFLOPs")
    ax.set_ylabel("last test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the command line -------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="the sweep file (YAML)")
    parser.add_argument("--jobs", type=int, default=1, help="local launcher: runs at once (default 1)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
    parser.add_argument("--summary", action="store_true", help="only summarise what has finished")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    sweep = load_sweep(args.sweep)
    failed = {} if args.summary else run_sweep(sweep, args.launcher, args.jobs)
    summarize_sweep(sweep)
    for name, where in failed.items():
        print(f"failed: {name} (output in {where}); run the sweep again to resume it", file=sys.stderr)
    return 1 if failed else 0


def cli(argv: list[str] | None = None) -> int:
    """main() with a user error as one line on stderr and exit status 2; SIGTERM or Ctrl-C as one line and exit
    status 143 resp. 130, once the runs it started have ended keeping their last checkpoints."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM): the runs it started keep their last checkpoints; run the sweep again to resume "
              "them", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted: the runs it started keep their last checkpoints; run the sweep again to resume them",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
