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


@pytest.mark.precision
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, precision_mode):
    """float32: equal up to the order of floating-point sums. bfloat16 (measured on 12 steps: weights at most
    1.1e-3 apart, loss 3e-4 relative, outputs 3.9e-3, one bfloat16 rounding of an output near 1): tolerances of
    about four times that, which two processes without synchronised BN (weights 0.027 apart, loss 2e-3, outputs
    0.031) do not meet."""
    single, double = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    subprocess.run([sys.executable, WORKER, single, "sync"], cwd=ROOT, check=True, timeout=120,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc = _torchrun(WORKER, double, "sync")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    bf16 = precision_mode == "bfloat16"
    state_tol, loss_tol, out_tol = (5e-3, 1e-3, 1.5e-2) if bf16 else (1e-6, 1e-5, 1e-6)
    for name, value in a["state"].items():
        torch.testing.assert_close(b["state"][name], value, rtol=0 if bf16 else 1e-5, atol=state_tol, msg=name)
    assert b["state"]["network.bn.running_var"].dtype == torch.float32  # running statistics stay float32
    assert b["losses"]["ce"] == pytest.approx(a["losses"]["ce"], rel=loss_tol)
    assert torch.equal(a["targets"], b["targets"])  # every sample once, in order
    torch.testing.assert_close(b["outputs"], a["outputs"], rtol=0 if bf16 else 1e-5, atol=out_tol)


def test_two_processes_through_main_train_with_sync_bn_under_bfloat16_autocast(tmp_path):
    """torchrun, 2 CPU processes, sync_bn, bfloat16 autocast forced (native or not): the run finishes, and the
    synchronised BN's running statistics stay float32."""
    from conftest import TINY
    from trainer.results import read_results

    args = ["main.py", "--config", os.path.join(ROOT, "options", "finetune_il", "digits.yaml"), *TINY,
            "--img_size", "8", "--sync_bn", "true", "--note", "ddp", "--log_root", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CL_AUTOCAST="bfloat16")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = [os.path.join(d, "ddp") for d, subdirs, _ in os.walk(tmp_path) if "ddp" in subdirs]
    assert read_results(run_dir)["runs"][0]["complete"]
    state = torch.load(os.path.join(run_dir, "checkpoints", "seed1_latest.pt"), weights_only=True)["method"]
    stats = [v for k, v in state.items() if k.endswith(("running_mean", "running_var"))]
    assert stats and {v.dtype for v in stats} == {torch.float32}
