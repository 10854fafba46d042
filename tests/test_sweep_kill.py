"""A sweep killed for real (trainer/sweep.py): 2 configs x 2 learning rates x 2 seeds through the local launcher, sent
SIGTERM mid-way (it ends the main.py runs it started, each keeping its last checkpoint), then run again. The second
invocation finishes every point, the interrupted points with the numbers of an uninterrupted run, and trains nothing
twice: no task checkpoint written before the kill is written again, finished points are left alone, no run folder is
added and no temporary file is left. A third invocation finds every point finished and trains nothing."""
import glob
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT
from trainer import sweep
from trainer.checkpoint import TEMPORARY

DIGITS = os.path.join(ROOT, "options", "finetune_il", "digits.yaml")
# checkpoint_every: a kill can also land between an epoch's checkpoint and the task's
FIXED = {"device": "cpu", "epochs": 1, "init_epochs": 1, "init_cls": 5, "increment": 5, "img_size": 8,
         "checkpoint_every": 1}
POLL_S, START_LIMIT_S, EXIT_LIMIT_S = 0.02, 600, 120
TASK_CHECKPOINT = re.compile(r"seed\d+_task\d+\.pt")
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the process group from /proc")


def snapshot(log_root) -> dict[str, tuple[int, str]]:
    """Every file under the sweep's runs/: path -> (mtime_ns, sha256 of its bytes)."""
    out = {}
    for folder, _, names in os.walk(os.path.join(str(log_root), "runs")):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[path] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def run_folders(log_root) -> list[str]:
    """The run folders: <log_root>/runs/<config>/<method>/<dataset>/<backbone>_<split>/<note>."""
    return sorted(p for p in glob.glob(os.path.join(str(log_root), "runs", *"*****")) if os.path.isdir(p))


def summary_written(folder) -> bool:
    try:
        with open(os.path.join(folder, "results.json")) as f:
            return bool(json.load(f).get("summary"))
    except (OSError, ValueError):  # not written yet (results.json is replaced whole, never half-written)
        return False


def started(folder, seed=1) -> bool:
    """Whether the run in `folder` has trained task 0 of `seed`."""
    return os.path.exists(os.path.join(folder, "checkpoints", f"seed{seed}_task0.pt"))


def numbers(folder) -> list:
    with open(os.path.join(folder, "results.json")) as f:
        runs = json.load(f)["runs"]
    return [(r["seed"], r["complete"], [t["acc"] for t in r["tasks"]], [t["acc_per_task"] for t in r["tasks"]])
            for r in runs]


def live_runs(tmp) -> list[int]:
    """The live processes (not zombies) whose command line names a path under `tmp`: the sweep and its main.py
    runs."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if str(tmp).encode() in cmdline and not zombie:
            alive.append(int(pid))
    return alive


def kill_and_run_again(tmp) -> dict:
    """The sweep in `tmp` started as its own process group and killed with SIGTERM once one point has finished and
    another has trained task 0 of seed 1 but not yet of seed 2 (so it has at least a task left to train: the kill
    cannot come too late); what the kill left; the second invocation; the interrupted points run again
    uninterrupted under another log_root."""
    import main

    other = tmp / "other" / "digits.yaml"  # a second base config: the same method with another memory
    other.parent.mkdir()
    config = yaml.safe_load(open(DIGITS))
    config["basic"]["memory_size"] = 100
    other.write_text(yaml.safe_dump(config))
    data = {"configs": [DIGITS, str(other)], "grid": {"lrate": [0.02, 0.05]}, "seeds": [1, 2], "fixed": FIXED}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump({**data, "log_root": str(tmp / "logs")}))
    points = sweep.load_sweep(str(path)).points

    start = time.monotonic()
    with open(tmp / "sweep_output.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trainer.sweep", str(path), "--jobs", "2"], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while proc.poll() is None and time.monotonic() - start < START_LIMIT_S:
            folders = [f for f in (p.folder() for p in points) if f]
            done = [f for f in folders if summary_written(f)]
            if done and any(started(f) and not started(f, seed=2) for f in folders if f not in done):
                break
            time.sleep(POLL_S)
        assert proc.poll() is None, "the sweep ended before the kill: the test proves nothing"
        proc.send_signal(signal.SIGTERM)  # the sweep alone, as `kill <pid>`: it ends its runs itself
        code = proc.wait(timeout=EXIT_LIMIT_S)
        left = live_runs(tmp)
    finally:
        for pid in [proc.pid] * (proc.poll() is None) + live_runs(tmp):
            os.kill(pid, signal.SIGKILL)
    killed_after = time.monotonic() - start
    assert not left, "a main.py run outlived the sweep"

    before = snapshot(tmp / "logs")
    folders = {(p.group, p.note): p.folder() for p in points}
    states = [sweep.state(p)[0] for p in points]

    start = time.monotonic()
    second = sweep.cli([str(path), "--jobs", "2"])
    second_s = time.monotonic() - start

    # the reference: the points the kill interrupted, run uninterrupted by main.py in this process (no second
    # start-up) on the threads the local launcher gives each of its 2 jobs, under another log_root
    ref_path = tmp / "reference.yaml"
    ref_path.write_text(yaml.safe_dump({**data, "log_root": str(tmp / "reference")}))
    reference = sweep.load_sweep(str(ref_path))
    start, threads = time.monotonic(), torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))
    try:
        ref = {(p.group, p.note): main.main(sweep.command(p, reference))
               for p, what in zip(reference.points, states) if what == "interrupted"}
    finally:
        torch.set_num_threads(threads)
    print(f"\nkilled after {killed_after:.1f} s, second invocation {second_s:.1f} s, reference of {len(ref)} "
          f"point(s) {time.monotonic() - start:.1f} s")
    return dict(path=str(path), points=points, code=code, before=before, folders=folders, states=states,
                second=second, reference=ref)


def test_a_sweep_killed_mid_way_resumes_to_the_same_numbers_and_trains_nothing_twice(tmp_path):
    """One test, not three on a shared fixture: pytest-xdist's default distribution would run the fixture (the
    longest part of the suite's sweep tests) once per worker."""
    killed = kill_and_run_again(tmp_path)
    points, states, before, folders = killed["points"], killed["states"], killed["before"], killed["folders"]

    # the kill stopped the sweep mid-way, cleanly: its runs ended keeping their checkpoints, and so did it
    assert killed["code"] == 128 + signal.SIGTERM
    assert "finished" in states and "interrupted" in states
    assert any(TASK_CHECKPOINT.fullmatch(os.path.basename(p)) for p in before), "a task was trained"
    assert not [p for p in before if TEMPORARY.fullmatch(os.path.basename(p))], "no half-written file"

    # the second invocation finishes every point; the interrupted ones with the uninterrupted numbers
    assert killed["second"] == 0
    assert [sweep.state(p)[0] for p in points] == ["finished"] * 4
    assert killed["reference"]
    for name, folder in killed["reference"].items():
        resumed = numbers(folders[name])
        assert [r[:2] for r in resumed] == [(1, True), (2, True)]
        assert resumed == numbers(folder)

    # nothing trained twice: every task checkpoint and every file of a finished point as the kill left it (same
    # bytes, same modification time); each interrupted point finished in its own folder; no file left half-written
    after = snapshot(tmp_path / "logs")
    kept = [p for p in before if TASK_CHECKPOINT.fullmatch(os.path.basename(p))]
    for point, what in zip(points, states):
        folder = folders[point.group, point.note]
        if what == "finished":
            kept += [p for p in before if p.startswith(folder + os.sep)]
        if folder is not None:
            assert point.folder() == folder, "an interrupted point resumes in its own folder"
    assert {p: after.get(p) for p in kept} == {p: before[p] for p in kept}
    assert len(run_folders(tmp_path / "logs")) == 4, "one run folder per point, none added"
    assert not [p for p in after if TEMPORARY.fullmatch(os.path.basename(p))]

    # a third invocation finds everything finished: it trains nothing and writes nothing under runs/
    assert sweep.cli([killed["path"], "--jobs", "2"]) == 0
    assert snapshot(tmp_path / "logs") == after and len(run_folders(tmp_path / "logs")) == 4
    rows, _ = sweep.summarize_sweep(sweep.load_sweep(killed["path"]))
    assert [(r["point"], r["state"], r["seeds"]) for r in rows] == [
        (f"lrate={lr}", "finished", 2) for _ in range(2) for lr in (0.02, 0.05)]
    assert all(r["last_acc"]["std"] is not None for r in rows)
    with open(tmp_path / "logs" / "summary.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 4
