"""The one way a benchmark runs a configuration: `run_config` runs main.py with a command line and returns the
content of the run's results.json and its run folder. A library module, not a script:

    from benchmarks.run import run_config
    results, run_dir = run_config(["--config", "options/icarl/digits.yaml", "--seed", "1"], log_root="/tmp/logs")
    results, run_dir = run_config([...], log_root=..., threads=1)            # isolated: a subprocess on 1 thread
    results, run_dir = run_config([...], log_root=..., root="../before")     # another checkout's main.py
    results, run_dir = run_config([...], log_root=..., threads=1, procs=2)   # 2 processes under torchrun

Paths in `argv` (--config, --pretrain_path) are relative to the repository root of the run (`root`, else this
one), which is the working directory of a subprocess and, for a run in this process, the directory benchmarks
are run from (`python -m benchmarks.<sub>.<name>` from the repository root).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what trainer.results.run_folder appends to a taken folder name: _<YYYYmmdd_HHMMSS>, then ~<i>
_STAMP = r"(_\d{8}_\d{6}(~\d+)?)?"


class RunFailed(RuntimeError):
    """A run in a subprocess failed (the message is the last line of its stderr) or left no results.json."""


def run_config(argv: list[str], *, log_root: str, root: str | None = None, threads: int | None = None,
               procs: int = 1) -> tuple[dict, str]:
    """Run main.py with `argv` plus `--log_root log_root`; return (results.json's content, the run folder).

    By default the run is in this process (`main.main`, which returns the run folder). It is a subprocess when
    `root` (another checkout, whose own main.py runs with cwd=root), `threads` (OMP_NUM_THREADS and
    MKL_NUM_THREADS of the run, so its numbers and time do not depend on the caller's threads) or `procs` > 1
    (torch.distributed.run --standalone with `procs` processes) is given; its failure raises RunFailed. Its run
    folder is the one folder under `log_root` that gained a results.json during the run, of argv's `--note` if
    it gives one: runs sharing a `log_root` at the same time need notes of their own.
    """
    if "--log_root" in argv:
        raise ValueError("give the log root as run_config(log_root=...), not in argv")
    log_root = os.path.abspath(log_root)  # a subprocess runs in another directory
    note = argv[argv.index("--note") + 1] if "--note" in argv else None
    argv = [*argv, "--log_root", log_root]
    if root is None and threads is None and procs == 1:
        import main

        run_dir = main.main(argv)
        if run_dir is None:
            raise RunFailed(f"main.py {' '.join(argv)} returned no run folder (it launched processes on GPUs)")
        return _read(run_dir), run_dir
    before = _run_folders(log_root, note)
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    proc = subprocess.run([sys.executable, *launcher, "main.py", *argv], cwd=os.path.abspath(root or ROOT), env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        if procs > 1:  # torchrun ends with a summary of its own: the error is the last line a rank wrote
            lines = [line for line in lines if line.startswith("[rank")] or lines
        raise RunFailed((lines or [f"exit status {proc.returncode}, no output"])[-1])
    new = sorted(_run_folders(log_root, note) - before)
    if len(new) != 1:
        raise RunFailed(f"expected one new results.json under {log_root}" + (f" (note {note})" if note else "")
                        + f", found {len(new)}")
    return _read(new[0]), new[0]


def finished_run(log_root: str, note: str) -> tuple[dict, str] | None:
    """The newest finished run (results.json with a summary) named after `note` under `log_root`, as
    (results, run folder); None if there is none. For scripts that reuse the runs of an earlier invocation."""
    found = [(r, d) for d in _run_folders(os.path.abspath(log_root), note)
             if (r := _read(d)) is not None and r.get("summary")]
    if not found:
        return None
    return max(found, key=lambda pair: os.path.getmtime(os.path.join(pair[1], "results.json")))


def _run_folders(log_root: str, note: str | None) -> set[str]:
    """The folders under `log_root` holding a results.json (named after `note`, when given)."""
    folders = {os.path.dirname(p) for p in glob.glob(os.path.join(glob.escape(log_root), "**", "results.json"),
                                                     recursive=True)}
    if note is None:
        return folders
    return {f for f in folders if re.fullmatch(re.escape(note) + _STAMP, os.path.basename(f))}


def _read(run_dir: str) -> dict | None:
    from trainer.results import read_results

    return read_results(run_dir)
