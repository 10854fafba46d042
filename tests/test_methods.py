"""Every registered method runs two tiny digits tasks through main.py, parametrised over the registry."""
import math
import os

import pytest

from conftest import ROOT, TINY
from methods import METHODS


@pytest.mark.parametrize("method", METHODS.keys())
def test_method_runs_two_tasks(method, run_main):
    config = os.path.join(ROOT, "options", method, "digits.yaml")
    assert os.path.isfile(config), f"every method ships options/{method}/digits.yaml"
    results, run_dir = run_main("--config", config, *TINY)
    run = results["runs"][0]
    single = METHODS.meta(method)["method_type"] in ("single_step", "pretrain")  # one task holding every class
    assert len(run["tasks"]) == (1 if single else 2)
    for i, task in enumerate(run["tasks"]):
        assert 0.0 <= task["acc"] <= 100.0
        assert len(task["acc_per_task"]) == i + 1
        assert task["gflops"] > 0 and task["params"] > 0
    assert run["acc_matrix"][0][0] is not None and math.isfinite(run["last_acc"])
    assert results["summary"]["last_acc"]["mean"] == pytest.approx(run["last_acc"])
    assert os.path.isfile(os.path.join(run_dir, "config.yaml")) and os.path.isfile(os.path.join(run_dir, "run.log"))
