"""Run outputs beyond results.json: TensorBoard scalars, the comparison table, and a NaN loss stopping cleanly."""
import csv
import glob
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from conftest import ROOT, TINY
from trainer import checkpoint, summarize

DIGITS = os.path.join(ROOT, "options", "finetune_il", "digits.yaml")


def test_tensorboard_scalars_and_summary_table(run_main, tmp_path):
    results, run_dir = run_main("--config", DIGITS, *TINY, "--seed", "1", "2", "--logger_type", "tensorboard")
    assert [r["seed"] for r in results["runs"]] == [1, 2] and results["summary"]["last_acc"]["std"] >= 0
    events = EventAccumulator(os.path.join(run_dir, "tensorboard", "seed2")).Reload()
    tags = events.Tags()["scalars"]
    assert "task0/train/ce" in tags and "acc/seen_classes" in tags
    assert len(events.Scalars("acc/seen_classes")) == 2
    with open(os.path.join(run_dir, "results.csv")) as f:
        assert len(list(csv.DictReader(f))) == 4  # 2 seeds x 2 tasks
    table = tmp_path / "table.csv"
    rows = summarize.main([str(tmp_path), "--csv", str(table)])
    assert len(rows) == 1 and rows[0]["method"] == "finetune_il" and rows[0]["seeds"] == "1 2"
    with open(table) as f:
        assert list(csv.DictReader(f))[0]["last_acc"] == rows[0]["last_acc"]


def test_non_finite_loss_stops_with_the_task_named_and_keeps_the_last_checkpoint(tmp_path, capsys):
    code = main.cli(["--config", DIGITS, *TINY, "--init_lrate", "0.02", "--lrate", "1e30", "--log_root",
                     str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "task 1" in err[0] and "epoch 1" in err[0]
    (run_dir,) = glob.glob(str(tmp_path / "*" / "*" / "*" / "*"))
    state = checkpoint.load(checkpoint.task_path(run_dir, 1, 0))
    assert state["position"] == {"task": 0, "done": True}
