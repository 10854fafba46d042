"""Data-parallel training on gloo with 2 CPU processes launched by torchrun: the engine's sharded batches,
DistributedDataParallel and synchronised batch norm give the single-process result of the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

WORKER = os.path.join(ROOT, "tests", "_ddp_engine.py")


def _torchrun(*args, nproc=2, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    single, double = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    subprocess.run([sys.executable, WORKER, single, "sync"], cwd=ROOT, check=True, timeout=120,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc = _torchrun(WORKER, double, "sync")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    for name, value in a["state"].items():  # equal up to the order of floating-point sums
        torch.testing.assert_close(b["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert b["losses"]["ce"] == pytest.approx(a["losses"]["ce"], rel=1e-5)
    assert torch.equal(a["targets"], b["targets"])  # every sample once, in order
    torch.testing.assert_close(b["outputs"], a["outputs"], rtol=1e-5, atol=1e-6)
