"""Run folders that are not what they seem (issue 28): run folders are shared between people and copied between
machines, so a resume or a re-test (`--checkpoint_dir`) must not write through a link planted in one (the lock
file and run.log are opened without following links and must be plain files; whole files are renamed over a
link, never written through it), must not hang on a FIFO, must clean up the temporary files a killed writer left,
and a run ended by SIGTERM (a cluster scheduler) must stop like Ctrl-C and resume. Runs are two digits tasks of
one epoch at 8 px (the finished run of tests/test_robustness.py)."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import main
from conftest import ROOT
from test_robustness import (DIGITS, TINY, ckpt, copy_run, fails, files, finished, no_plots,  # noqa: F401 - fixtures
                             rewound, run_folders)
from trainer import checkpoint
from trainer.checkpoint import atomic_write
from trainer.results import read_results

SECRET = b"someone else's file\n"


def _outside(tmp_path, name="outside.txt") -> str:
    """A file outside the run folder, with known content: what a planted link points to."""
    path = tmp_path / name
    path.write_bytes(SECRET)
    return str(path)


def _plant(path: str, kind: str, tmp_path) -> str | None:
    """Put `kind` at `path` in a run folder (replacing what is there); returns the outside file it reaches."""
    if os.path.lexists(path):
        os.remove(path)
    target = None
    if kind in ("symlink", "hardlink"):
        target = _outside(tmp_path)
        (os.symlink if kind == "symlink" else os.link)(target, path)
    elif kind == "dangling":  # a link to a file that does not exist yet: following it would create the file
        target = str(tmp_path / "created_outside.txt")
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        os.mkdir(path)
    return target


def _unchanged(target: str | None, kind: str) -> None:
    if kind == "dangling":
        assert not os.path.lexists(target), "the link was followed: a file was created outside the run folder"
    elif target is not None:
        with open(target, "rb") as f:
            assert f.read() == SECRET, "the link was followed: the file it points to was written"


# ---- the lock file and run.log: opened without following a link, plain files only -----------------------------

@pytest.mark.parametrize("kind", ["symlink", "dangling", "hardlink", "fifo", "folder"])
@pytest.mark.parametrize("name", [".lock", "run.log"])
def test_a_planted_lock_or_log_stops_a_retest_in_one_line(name, kind, finished, tmp_path, capsys):
    """A re-test of a finished run (the same flag as a resume, on a finished run) with its .lock or run.log
    replaced by a link out of the folder, a FIFO or a folder: one line naming the file, at once, nothing written
    in the run folder or through the link."""
    run_dir = copy_run(finished, tmp_path)
    path = os.path.join(run_dir, name)
    target = _plant(path, kind, tmp_path)
    before = files(run_dir)
    start = time.perf_counter()
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert time.perf_counter() - start < 2, "refused at once, never waiting on a FIFO"
    assert path in line
    _unchanged(target, kind)
    assert files(run_dir) == before
    assert not os.path.exists(os.path.join(run_dir, "results_retest.json"))


@pytest.mark.parametrize("name", [".lock", "run.log"])
def test_a_planted_lock_or_log_link_stops_a_resume_in_one_line(name, finished, tmp_path, capsys):
    """The same on an unfinished run (a resume, which would train task 1)."""
    run_dir = rewound(finished, tmp_path)
    path = os.path.join(run_dir, name)
    target = _plant(path, "symlink", tmp_path)
    before = files(run_dir)
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert path in line and "symbolic link" in line
    _unchanged(target, "symlink")
    assert files(run_dir) == before


@pytest.mark.parametrize("name", ["checkpoints", "tensorboard", os.path.join("tensorboard", "seed1"), "wandb"])
def test_a_folder_of_the_run_planted_as_a_link_is_refused(name, finished, tmp_path, capsys):
    """checkpoints/, tensorboard/(seed1/) or wandb/ as a link out of the run folder would make a resume create its files
    there."""
    run_dir = rewound(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    if name == "checkpoints":
        shutil.move(os.path.join(run_dir, name), elsewhere)
    else:
        elsewhere.mkdir()
        os.makedirs(os.path.dirname(os.path.join(run_dir, name)), exist_ok=True)
    (elsewhere / ".seed1_latest.pt.abc123.tmp").write_bytes(SECRET)  # our temporary's name: left alone outside
    os.symlink(elsewhere, os.path.join(run_dir, name))
    before = files(elsewhere)
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert os.path.join(run_dir, name) in line
    assert files(elsewhere) == before and (elsewhere / ".seed1_latest.pt.abc123.tmp").read_bytes() == SECRET


def test_atomic_write_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    """results.json, config.yaml and the checkpoints are written by `atomic_write`: the rename replaces a link
    at the path by the new file, the file the link points to is untouched."""
    target = _outside(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = str(run_dir / "results.json")
    os.symlink(target, path)
    atomic_write(path, lambda f: f.write("{}"), "results file", binary=False)
    assert not os.path.islink(path) and open(path).read() == "{}"
    _unchanged(target, "symlink")


# ---- temporary files a killed writer left ---------------------------------------------------------------------

def test_remove_temporaries_removes_only_our_own_and_never_follows_a_link(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    target = _outside(tmp_path)
    (folder / ".seed1_latest.pt.abc123.tmp").write_bytes(b"half")
    os.symlink(target, folder / ".seed1_task0.pt.def456.tmp")
    (folder / ".seed1_task1.pt.ghi789.tmp").mkdir()  # a folder of that name: not ours
    (folder / ".seed1_task1.pt.ghi789.tmp" / "x").write_bytes(b"x")
    kept = ["seed1_latest.pt", "notes.tmp", ".hidden.tmp", ".seed1_latest.pt.tmp.bak"]
    for name in kept:
        (folder / name).write_bytes(b"keep")
    assert sorted(checkpoint.remove_temporaries(str(folder))) == [".seed1_latest.pt.abc123.tmp",
                                                                  ".seed1_task0.pt.def456.tmp"]
    assert sorted(os.listdir(folder)) == sorted([*kept, ".seed1_task1.pt.ghi789.tmp"])
    _unchanged(target, "symlink")
    linked = tmp_path / "linked"
    os.symlink(folder, linked)
    (folder / ".seed1_latest.pt.abc123.tmp").write_bytes(b"half")
    assert checkpoint.remove_temporaries(str(linked)) == [], "a folder that is a link is not entered"
    assert (folder / ".seed1_latest.pt.abc123.tmp").exists()
    assert checkpoint.remove_temporaries(str(tmp_path / "none")) == []


def test_a_resume_removes_the_temporary_files_a_kill_left(finished, tmp_path):
    """A kill between the steps of `atomic_write` leaves a hidden .tmp file; the next start (under the lock)
    removes it, and removes a link of such a name without following it. A link planted as a checkpoint the
    resume writes is replaced, not written through."""
    run_dir = rewound(finished, tmp_path)  # the resume trains task 1 and writes seed1_task1.pt
    target = _outside(tmp_path)
    orphans = [ckpt(run_dir, ".seed1_latest.pt.abc123.tmp"), os.path.join(run_dir, ".results.json.x_9z.tmp")]
    for path in orphans:
        with open(path, "wb") as f:
            f.write(b"half-written")
    linked = ckpt(run_dir, ".seed1_latest.pt.def456.tmp")
    os.symlink(target, linked)
    os.symlink(target, ckpt(run_dir, "seed1_task1.pt"))
    keep = os.path.join(run_dir, "notes.tmp")
    with open(keep, "w") as f:
        f.write("mine")
    assert main.cli(["--checkpoint_dir", run_dir]) == 0
    assert not any(os.path.lexists(p) for p in [*orphans, linked])
    assert not os.path.islink(ckpt(run_dir, "seed1_task1.pt"))
    _unchanged(target, "symlink")
    assert open(keep).read() == "mine"
    assert read_results(run_dir)["runs"][0]["complete"]


# ---- SIGTERM ---------------------------------------------------------------------------------------------------

def test_sigterm_ends_a_run_like_ctrl_c_and_the_run_resumes_to_the_same_numbers(finished, tmp_path):
    """A scheduler's SIGTERM once the run has a checkpoint: one line on stderr, exit status 143 (128 + 15), the
    checkpoint kept; the resume ends with the numbers of the uninterrupted run (the finished run: same config)."""
    root = tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the numbers of this process's threads
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--config", DIGITS, *TINY, "--note",
                             "base", "--log_root", str(root)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not glob.glob(os.path.join(str(root), "**", "*.pt"), recursive=True):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint in 10 minutes"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1].decode().strip().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, err)
    assert len(err) == 1 and "SIGTERM" in err[0] and "--checkpoint_dir" in err[0], err
    (run_dir,) = run_folders(root)
    assert not read_results(run_dir) or not read_results(run_dir)["runs"][0].get("complete"), "still running"
    assert main.cli(["--checkpoint_dir", run_dir]) == 0
    resumed, whole = read_results(run_dir)["runs"][0], finished[1]["runs"][0]
    assert resumed["complete"]
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["last_acc"] == whole["last_acc"]


def test_the_sigterm_handler_lives_only_inside_cli_in_the_main_thread(capsys):
    """Importing main installs nothing; cli puts the previous handler back; cli in another thread (where Python
    cannot install a handler) still runs."""
    assert signal.getsignal(signal.SIGTERM) is not main._terminate

    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        assert main.cli(["--list", "methods"]) == 0
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main.cli(["--list", "methods"])))
    thread.start()
    thread.join()
    assert codes == [0]
    capsys.readouterr()


def test_a_signal_during_a_write_takes_effect_after_it(tmp_path):
    """SIGTERM arriving while atomic_write writes: the file is written whole, then the handler runs."""
    from trainer.checkpoint import atomic_write

    seen = []

    def handler(signum, frame):
        seen.append(os.path.exists(tmp_path / "f.bin"))
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(str(tmp_path / "f.bin"), lambda f: (signal.raise_signal(signal.SIGTERM), f.write(b"x" * 10)))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [True] and (tmp_path / "f.bin").read_bytes() == b"x" * 10
    assert os.listdir(tmp_path) == ["f.bin"]
