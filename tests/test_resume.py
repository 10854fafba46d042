"""A run stopped right after a checkpoint inside any stage of a multi-stage method resumes from that checkpoint
(stage name and epoch, optimiser, RNG, memory, frozen copies, adapters, merged adapters) to exactly the numbers
of an uninterrupted run."""
import glob
import json
import os

import pytest

import main
from conftest import ROOT, TINY
from trainer import checkpoint

STAGES = [("bic", "train"), ("bic", "bias"), ("acl", "adapters"), ("acl", "heads"), ("dynammo", "adapters"),
          ("dynammo", "heads"), ("dynamic_er", "train"), ("dynamic_er", "balance"), ("ucir", "train"),
          ("ucir", "balanced")]
_whole: dict[str, dict] = {}


class _Stop(Exception):
    pass


def _args(method):
    args = ["--config", os.path.join(ROOT, "options", method, "digits.yaml"), *TINY, "--img_size", "8", "--epochs",
            "2", "--checkpoint_every", "1", "--save_models", "false", "--note", "run"]
    return args + (["--epochs_finetune", "2"] if method != "bic" else ["--epochs_bias", "3"])


def _record(root):
    (path,) = glob.glob(os.path.join(root, "**", "results.json"), recursive=True)
    with open(path) as f:
        return json.load(f)["runs"][0]


@pytest.mark.parametrize("method, stage", STAGES)
def test_stopped_inside_a_stage_resumes_to_the_same_results(method, stage, tmp_path, monkeypatch):
    if method not in _whole:
        main.main([*_args(method), "--log_root", str(tmp_path / "whole")])
        _whole[method] = _record(tmp_path / "whole")
    save = checkpoint.save

    def save_then_stop(path, state):
        save(path, state)
        where = state["position"]
        if where["task"] == 1 and not where["done"] and where["stage"] == stage and where["epoch"] == 1:
            raise _Stop

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(_Stop):
        main.main([*_args(method), "--log_root", str(tmp_path / "stopped")])
    monkeypatch.undo()
    (run_dir,) = glob.glob(str(tmp_path / "stopped" / "**" / "run"), recursive=True)
    main.main(["--checkpoint_dir", run_dir, "--device", "cpu"])
    resumed, whole = _record(tmp_path / "stopped"), _whole[method]
    assert resumed["complete"]
    assert resumed["acc_matrix"] == whole["acc_matrix"]
    assert resumed["last_acc"] == whole["last_acc"]
    assert [t.get("task_id_acc") for t in resumed["tasks"]] == [t.get("task_id_acc") for t in whole["tasks"]]
