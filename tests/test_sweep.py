"""Sweeps (trainer/sweep.py): a tiny grid through submitit's local executor; the summary chooses by validation
accuracy only; per-config entries; bad sweep files are one line, exit 2, nothing written. The local launcher, a
kill mid-way and the invocations after it: tests/test_sweep_kill.py."""
import json
import os
import time

import pytest
import yaml

from conftest import ROOT
from trainer import sweep
from trainer.config_loader import load_config
from methods import method_config

DIGITS = os.path.join(ROOT, "options", "finetune_il", "digits.yaml")
FIXED = {"device": "cpu", "epochs": 1, "init_epochs": 1, "init_cls": 5, "increment": 5, "img_size": 8}


def write_sweep(path, log_root, configs, **extra):
    data = {"configs": [c if isinstance(c, dict) else str(c) for c in configs], "fixed": FIXED,
            "log_root": str(log_root), **extra}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_submitit_local_executor_runs_the_sweep(tmp_path):
    path = write_sweep(tmp_path / "grid.yaml", tmp_path / "logs", [DIGITS], grid={"lrate": [0.02, 0.05]},
                       seeds=[1], slurm={"partition": "none", "time_min": 10, "cpus_per_task": 1})
    assert sweep.cli([path, "--launcher", "local_submitit"]) == 0
    rows, _ = sweep.summarize_sweep(sweep.load_sweep(path))
    assert [(r["point"], r["state"], r["seeds"]) for r in rows] == [("lrate=0.02", "finished", 1),
                                                                    ("lrate=0.05", "finished", 1)]
    assert os.listdir(tmp_path / "logs" / "submitit")


def _fake_results(point, vals, tests):
    """A finished results.json for `point` written by hand: one complete record per seed, final val_acc `vals`
    (None: not recorded) and last test accuracy `tests`."""
    folder = os.path.join(point.runs_root, "finetune_il", "digits", "resnet32_b5i5", point.note)
    os.makedirs(folder)
    runs = []
    for seed, val, test in zip(point.cfg.seed, vals, tests):
        task = {"acc": test, "gflops": 0.004, **({"val_acc": val} if val is not None else {})}
        runs.append({"seed": seed, "complete": True, "tasks": [task], "last_acc": test, "avg_incremental_acc": test})
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"config": point.cfg.to_dict(), "runs": runs, "summary": {"last_acc": {"mean": 0}}}, f)


def test_the_best_point_is_chosen_by_validation_accuracy_never_by_test_accuracy(tmp_path):
    path = write_sweep(tmp_path / "grid.yaml", tmp_path / "logs", [DIGITS], grid={"lrate": [0.01, 0.02, 0.03]},
                       seeds=[1, 2])
    points = sweep.load_sweep(path).points
    _fake_results(points[0], [60.0, 62.0], [90.0, 92.0])  # the best test accuracy
    _fake_results(points[1], [70.0, 74.0], [80.0, 80.0])  # the best validation accuracy
    _fake_results(points[2], [65.0, 65.0], [85.0, 85.0])
    rows, best = sweep.summarize_sweep(sweep.load_sweep(path))
    assert best[DIGITS]["point"] == "lrate=0.02"
    assert best[DIGITS]["val_acc"]["mean"] == 72.0 and best[DIGITS]["last_acc"]["mean"] == 80.0
    chosen = str(tmp_path / "logs" / "best_finetune_il_digits.yaml")
    assert load_config(chosen, {}, method_config).lrate == 0.02
    assert os.path.isfile(tmp_path / "logs" / "summary.csv")


def test_without_validation_numbers_no_point_is_chosen(tmp_path):
    path = write_sweep(tmp_path / "grid.yaml", tmp_path / "logs", [DIGITS], grid={"lrate": [0.01, 0.02]},
                       seeds=[1])
    points = sweep.load_sweep(path).points
    _fake_results(points[0], [None], [90.0])
    _fake_results(points[1], [None], [80.0])
    rows, best = sweep.summarize_sweep(sweep.load_sweep(path))
    assert isinstance(best[DIGITS], str) and "validation" in best[DIGITS]
    assert not os.path.exists(tmp_path / "logs" / "best_finetune_il_digits.yaml")
    assert [r["state"] for r in rows] == ["finished", "finished"]


def test_long_points_get_distinct_plain_folder_names():
    a, b = sweep.slug({"milestones": list(range(100)), "lrate": 0.1}), sweep.slug({"milestones": list(range(101))})
    assert a != b and len(a.encode()) <= 200 and "/" not in a
    assert sweep.slug({"b": 1, "a": [30, 60]}) == "a=30-60_b=1"


@pytest.mark.parametrize("content, says", [
    ({"configs": [DIGITS], "grid": {"lrate": [0.1]}, "gird": 1}, "gird"),
    ({"configs": ["missing/nothing.yaml"], "grid": {"lrate": [0.1]}}, "nothing.yaml"),
    ({"configs": [DIGITS], "grid": {}}, "empty"),
    ({"configs": [DIGITS], "grid": {"lrate": []}}, "lrate"),
    ({"configs": [DIGITS], "grid": {"lrat": [0.1]}}, "lrat"),
    ({"configs": [DIGITS], "grid": {"note": ["x"]}}, "note"),
    ({"configs": [DIGITS], "grid": {f"k{i}": list(range(100)) for i in range(10)}}, "1000"),
    ({"configs": [DIGITS], "points": [{"lrate": 0.1}, {"lrate": 0.1}]}, "repeats"),
    ({"configs": [{"config": DIGITS, "gird": {"lrate": [0.1]}}], "grid": {"lrate": [0.1]}}, "gird"),
    ({"configs": [{"config": DIGITS}]}, "no points"),
    ({"configs": [{"config": DIGITS, "points": [{}], "fixed": {"epochs_bias": 2}}]}, "epochs_bias"),
    ({"configs": [{"config": DIGITS, "points": [{}], "fixed": {"memory_size": 0}}, DIGITS], "points": [{}]},
     "repeats"),
    ({"configs": [{"grid": {"lrate": [0.1]}}]}, "config"),
])
def test_a_bad_sweep_file_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, content, says):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**content, "log_root": str(tmp_path / "logs")}))
    start = time.monotonic()
    assert sweep.cli([str(path)]) == 2
    assert time.monotonic() - start < 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0] and says in err[0]
    assert os.listdir(tmp_path) == ["bad.yaml"]


def test_each_config_entry_takes_its_own_points_and_adds_its_fixed_to_the_sweeps(tmp_path):
    """A table of methods in one file: bic over its own grid, finetune_il as it is with no memory, both with the
    sweep's fixed budget."""
    bic = os.path.join(ROOT, "options", "bic", "digits.yaml")
    path = write_sweep(tmp_path / "table.yaml", tmp_path / "logs",
                       [{"config": bic, "grid": {"epochs_bias": [20, 100]}},
                        {"config": DIGITS, "points": [{}], "fixed": {"memory_size": 0, "epochs": 2}}], seeds=[4])
    points = sweep.load_sweep(path).points
    assert [(p.group, p.note) for p in points] == [("bic_digits", "epochs_bias=20"), ("bic_digits", "epochs_bias=100"),
                                                   ("finetune_il_digits", "default")]
    assert [p.cfg.epochs_bias for p in points[:2]] == [20, 100]
    assert [(p.cfg.memory_size, p.cfg.epochs, p.cfg.img_size, p.cfg.seed) for p in points] == [
        (200, 1, 8, [4]), (200, 1, 8, [4]), (0, 2, 8, [4])]
    assert sweep.command(points[2], sweep.load_sweep(path))[-4:] == ["--note", "default", "--log_root",
                                                                     points[2].runs_root]


def test_a_folder_holding_a_run_of_other_settings_is_refused_not_mixed_in(tmp_path, capsys):
    """The fixed overrides changed since the point ran: its folder is not taken as finished (or resumed)."""
    path = write_sweep(tmp_path / "grid.yaml", tmp_path / "logs", [DIGITS], grid={"lrate": [0.01]}, seeds=[1])
    (point,) = sweep.load_sweep(path).points
    _fake_results(point, [60.0], [90.0])
    before = sorted(os.walk(tmp_path))
    path = write_sweep(tmp_path / "grid.yaml", tmp_path / "logs", [DIGITS], grid={"lrate": [0.01]}, seeds=[1],
                       fixed={**FIXED, "epochs": 2})
    assert sweep.cli([path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and point.folder() in err[0] and "epochs" in err[0]
    assert sorted(os.walk(tmp_path)) == before
