"""Distributed runs through main.py: 2 CPU processes on gloo, launched by torchrun, against the single-process run
of the same global batch (digits has no augmentation; batch norm is synchronised, `sync_bn: true`).

The two compute the same thing but are not bit-exact: the gradient all-reduce, the synchronised BN statistics
and the gathered features sum in another order than one process does. In float32 resnet32 on the digits grows
that rounding into different weights within a few steps (one process with 1 thread against 2 threads, nothing
else changed, leaves batch-norm biases 3-6% apart after 12 steps at lr 0.002, and ends the default digits run 10
points apart), so these runs are in float64 (`precision: float64`), where the same rounding stays near 1e-14 and
every prediction, hence every entry of the accuracy matrix, must agree (within 0.5 points, less than one test
sample of a task). Results, logs and checkpoints are written once (rank 0); a rank killed with SIGKILL stops
the whole job; the run then resumes from its checkpoints, under 2 processes or under 1."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow  # python -m pytest -q -m slow (about 7 minutes on 2 cores)

WORKER = os.path.join(ROOT, "tests", "_ddp_main.py")
METHODS = ["finetune_il", "icarl", "dark_er", "gem", "dynammo"]
# small and fast: 2 tasks of 5 classes at 8 px, one epoch each, a small memory; the same for both runs
EXTRA = ["--img_size", "8", "--batch_size", "32", "--sync_bn", "true", "--memory_size", "40", "--note", "run",
         "--precision", "float64"]
TOLERANCE = 0.5  # points: one test sample of a 5-class digits task is 0.56
PER_METHOD = {"gem": ["--memory_per_class", "4"], "dynammo": ["--epochs_finetune", "1"]}


def argv(method, root, *more):
    return ["--config", os.path.join(ROOT, "options", method, "digits.yaml"), *TINY, *EXTRA,
            *PER_METHOD.get(method, []), "--log_root", str(root), *more]


def torchrun(spec: dict, folder, wait=True):
    spec_path = os.path.join(folder, "spec.json")
    with open(spec_path, "w") as f:
        json.dump({"pid_dir": str(folder), **spec}, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, spec_path]
    env = dict(os.environ, OMP_NUM_THREADS="1", CL_DIST_TIMEOUT="60")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_folder(root, method) -> str:
    (folder,) = glob.glob(os.path.join(str(root), method, "digits", "*", "run"))
    return folder


def results(folder) -> dict:
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    proc = torchrun({"runs": [argv(m, root) for m in METHODS]}, root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_give_the_single_process_accuracy_matrix(method, ddp_runs, tmp_path):
    import torch

    import main
    from trainer.results import read_results

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        single = read_results(main.main(argv(method, tmp_path)))
    finally:
        torch.set_num_threads(threads)
    folder = run_folder(ddp_runs, method)
    double = results(folder)
    a, b = single["runs"][0]["acc_matrix"], double["runs"][0]["acc_matrix"]
    assert len(a) == len(b) == 2
    for row_a, row_b in zip(a, b):
        for x, y in zip(row_a, row_b):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= TOLERANCE), (a, b)
    # written once: one run folder per method, one results file, one log line per task end
    assert len(glob.glob(os.path.join(str(ddp_runs), method, "digits", "*", "*"))) == 1
    with open(os.path.join(folder, "run.log")) as f:
        ends = [line for line in f if " task 1: acc " in line]
    assert len(ends) == 1, ends


@pytest.mark.parametrize("resume_world", [2, 1])
def test_a_rank_killed_stops_the_job_and_the_run_resumes(resume_world, tmp_path):
    """Killed under 2 processes once task 0 is checkpointed; resumed under 2 again, or in one process (checkpoints
    hold no rank state), from that checkpoint: task 0 is not trained again (its file is untouched)."""
    more = ["--epochs", "3", "--init_epochs", "3", "--checkpoint_every", "1"]
    proc = torchrun({"runs": [argv("finetune_il", tmp_path, *more)]}, tmp_path, wait=False)
    pattern = os.path.join(str(tmp_path), "finetune_il", "digits", "*", "run", "checkpoints", "seed1_task0.pt")
    try:
        deadline = time.time() + 300
        while not glob.glob(pattern):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.stdout else ""
            time.sleep(0.5)
        (task0,) = glob.glob(pattern)
        written = os.stat(task0).st_mtime_ns
        with open(tmp_path / "rank1.pid") as f:
            os.kill(int(f.read()), signal.SIGKILL)
        proc.wait(timeout=120)  # the launcher sees its worker die and stops the other one
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    folder = run_folder(tmp_path, "finetune_il")
    assert not results(folder)["runs"][0].get("complete")  # task 0's results are recorded, the run's are not
    if resume_world == 2:
        resumed = torchrun({"runs": [["--checkpoint_dir", folder]]}, tmp_path)
    else:
        resumed = subprocess.run([sys.executable, "main.py", "--checkpoint_dir", folder], cwd=ROOT, timeout=600,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    done = results(folder)
    assert len(done["runs"][0]["tasks"]) == 2 and done["runs"][0]["acc_matrix"][1][1] is not None
    assert os.stat(task0).st_mtime_ns == written
