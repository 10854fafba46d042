"""Every registered method with more than one training stage, stopped right after a checkpoint inside any stage of
its last task, resumes from that checkpoint (stage name and epoch, optimiser, RNG, memory, frozen copies,
adapters, merged adapters) to exactly the numbers of an uninterrupted run, and its finished run re-tests to the
same numbers. The stages are the method's own (`Method.stages`), read from the registry: nothing is listed here."""
import glob
import os

import pytest
import torch

import main
from conftest import ROOT, TINY
from methods import METHODS, method_config
from trainer import checkpoint
from trainer.cli import parse_overrides
from trainer.config_loader import load_config
from trainer.results import read_results
from trainer.task_loop import SeedRun
from utils.types import Stage


class _Stop(Exception):
    pass


def _args(method):
    """Two tiny tasks (CNNs at the digits' native 8 px), two epochs in every stage of the last task (`epochs` and
    each of the method's own `epochs*` keys), a checkpoint per epoch."""
    config = os.path.join(ROOT, "options", method, "digits.yaml")
    with open(config) as f:
        size = "16" if "vit" in f.read() else "8"
    stage_epochs = [k for k in method_config(method).__dataclass_fields__ if k.startswith("epochs")] \
        if method_config(method) else []
    return ["--config", config, *TINY, "--img_size", size, "--epochs", "2", "--checkpoint_every", "1",
            "--save_models", "true", "--note", "run", *[a for k in stage_epochs for a in (f"--{k}", "2")]]


def _last_task_stages(method) -> list[str]:
    """The names of the stages the method trains its last task in (built, not trained)."""
    args = _args(method)
    cfg = load_config(args[1], parse_overrides(args[2:]), method_config)
    run = SeedRun(cfg, 1, torch.device("cpu"))
    for task in run.data.tasks:
        run.method.begin_task(task)
    new_data = run.data.dataset("train", run.data.indices("train", task.classes))
    return [s.name for s in run.method.stages(task, new_data, run.engine.infer) if isinstance(s, Stage)]


@pytest.mark.parametrize("method", METHODS.keys())
def test_stopped_inside_any_stage_resumes_to_the_same_results_and_retests_to_them(method, tmp_path, monkeypatch):
    stages = _last_task_stages(method)
    if len(stages) < 2:
        pytest.skip(f"{method} trains in one stage (its resume: tests/test_checkpoint.py)")
    whole = read_results(main.main([*_args(method), "--log_root", str(tmp_path / "whole")]))["runs"][0]
    last = len(whole["tasks"]) - 1
    save = checkpoint.save
    for stage in stages:
        def save_then_stop(path, state, stage=stage):
            save(path, state)
            where = state["position"]
            if (where["task"], where["done"], where.get("stage"), where.get("epoch")) == (last, False, stage, 1):
                raise _Stop

        monkeypatch.setattr(checkpoint, "save", save_then_stop)
        with pytest.raises(_Stop):
            main.main([*_args(method), "--log_root", str(tmp_path / stage)])
        monkeypatch.undo()
        (stopped,) = glob.glob(str(tmp_path / stage / "**" / "run"), recursive=True)
        run_dir = main.main(["--checkpoint_dir", stopped, "--device", "cpu"])
        resumed = read_results(run_dir)["runs"][0]
        assert resumed["complete"], stage
        assert resumed["acc_matrix"] == whole["acc_matrix"], stage
        assert resumed["last_acc"] == whole["last_acc"], stage
        assert [t.get("task_id_acc") for t in resumed["tasks"]] == [t.get("task_id_acc") for t in whole["tasks"]]
    main.main(["--checkpoint_dir", run_dir, "--device", "cpu"])  # finished: a re-test of every task
    retested = read_results(run_dir, "results_retest")["runs"][0]
    assert retested["retested_tasks"] == list(range(last + 1))
    assert retested["acc_matrix"] == whole["acc_matrix"]
