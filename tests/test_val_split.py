"""The validation protocol (`val_split`, issue 29): a stratified, seeded share of each class's training samples is
held out; training, memory and class means see only the rest; every task records `val_acc` and
`val_acc_per_task` in results.json, results.csv and TensorBoard. With `val_split: 0` nothing changes (the numbers
are pinned by tests/test_golden.py; here: no validation key, an empty column). Runs are two digits tasks of one
epoch at 8 px."""
import csv
import json
import os
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from conftest import ROOT
from datasets.scenario import DataManager, validation_positions
from methods import method_config
from test_robustness import DIGITS, TINY, copy_run, fails, finished, run_folders  # noqa: F401 (a fixture)
from trainer import checkpoint, report
from trainer.config_loader import load_config

ICARL = os.path.join(ROOT, "options", "icarl", "digits.yaml")


def manager(config=DIGITS, seed=1, **keys) -> DataManager:
    return DataManager(load_config(config, {"img_size": 8, **keys}, method_config), seed)


def test_validation_positions_known_answer():
    labels = np.array([3] * 10 + [1] * 5 + [0] * 2 + [2] * 1)
    held = validation_positions(labels, 0.2, seed=7)
    # round(0.2 n) per class; at least 1 of a class of 2; none of a class of 1 (it keeps its only sample)
    assert {c: int((labels[held] == c).sum()) for c in range(4)} == {3: 2, 1: 1, 0: 1, 2: 0}
    assert np.array_equal(held, np.unique(held))  # sorted positions, no repeat
    assert np.array_equal(validation_positions(labels, 0.2, seed=7), held)
    assert validation_positions(labels, 0.0, seed=7).size == 0
    assert validation_positions(labels, 0.99, seed=7).tolist().count(17) == 0  # the class of one sample
    assert {c: int((labels[validation_positions(labels, 0.99, 7)] == c).sum()) for c in range(4)} == \
        {3: 9, 1: 4, 0: 1, 2: 0}  # at most n - 1: every class keeps a training sample


def test_the_split_is_stratified_disjoint_seeded_and_independent_of_method_and_class_order():
    data = manager(val_split=0.2)
    everything = range(data.n_classes)
    train, val = data.indices("train", everything), data.indices("val", everything)
    assert np.array_equal(val, data.val_index) and not np.intersect1d(train, val).size
    assert len(train) + len(val) == len(data.train_y)  # the training part is exactly the rest of the pool
    counts = np.bincount(data.train_y, minlength=data.n_classes)
    assert np.bincount(data.train_y[val], minlength=data.n_classes).tolist() == \
        [int(round(0.2 * n)) for n in counts]
    for c in everything:  # per class too: what memory and class means ask for
        assert not np.intersect1d(data.indices("train", [c]), val).size
        assert len(data.indices("train", [c])) + len(data.indices("val", [c])) == counts[c]
    assert np.array_equal(manager(val_split=0.2).val_index, val)
    assert not np.array_equal(manager(seed=2, val_split=0.2).val_index, val)
    # another method (its own config), another class order: the same samples are held out
    assert np.array_equal(manager(ICARL, val_split=0.2).val_index, val)
    assert np.array_equal(manager(val_split=0.2, shuffle=False).val_index, val)
    assert np.array_equal(manager(val_split=0.2, class_order_seed=5).val_index, val)
    view = data.dataset("val", val)
    assert len(view) == len(val) and not view.augment


def test_without_val_split_the_training_pool_is_whole():
    data = manager()
    everything = range(data.n_classes)
    assert data.val_index.size == 0 and data.indices("val", everything).size == 0
    assert np.array_equal(data.indices("train", everything), np.arange(len(data.train_y)))


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_a_val_split_outside_0_1_is_one_line(value, tmp_path, capsys):
    start = time.perf_counter()
    line = fails(["--config", DIGITS, *TINY, "--val_split", value], capsys, tmp_path)
    assert "val_split" in line and "[0, 1)" in line and time.perf_counter() - start < 2
    assert not run_folders(tmp_path)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """A finished finetune_il run with val_split 0.2 and a memory larger than every class, so the memory holds
    each class's whole training part: what the run trained on, observable in its checkpoint."""
    root = tmp_path_factory.mktemp("validated")
    plot, report.plot = report.plot, lambda *args, **kwargs: []
    try:
        run_dir = main.main(["--config", DIGITS, *TINY, "--val_split", "0.2", "--memory_size", "2000",
                             "--logger_type", "tensorboard", "--log_root", str(root)])
    finally:
        report.plot = plot
    with open(os.path.join(run_dir, "results.json")) as f:
        return run_dir, json.load(f)


def test_each_task_records_validation_accuracy(validated):
    run_dir, results = validated
    tasks = results["runs"][0]["tasks"]
    assert [len(t["val_acc_per_task"]) for t in tasks] == [1, 2]
    assert all(0 <= t["val_acc"] <= 100 and all(0 <= a <= 100 for a in t["val_acc_per_task"]) for t in tasks)
    assert tasks[0]["val_acc"] == tasks[0]["val_acc_per_task"][0]
    data = DataManager(load_config(os.path.join(run_dir, "config.yaml"), {}, method_config), 1)
    for t in tasks:  # a share of the seen classes' validation samples (not of their test samples)
        n = len(data.indices("val", range(t["classes"][1])))
        assert t["val_acc"] * n / 100 == pytest.approx(round(t["val_acc"] * n / 100), abs=1e-6)
    with open(os.path.join(run_dir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_acc"]) for r in rows] == [round(t["val_acc"], 4) for t in tasks]
    events = EventAccumulator(os.path.join(run_dir, "tensorboard", "seed1")).Reload()
    assert [e.value for e in events.Scalars("val_acc/seen_classes")] == \
        pytest.approx([t["val_acc"] for t in tasks])


def test_memory_holds_the_training_part_only(validated):
    run_dir, _ = validated
    data = DataManager(load_config(os.path.join(run_dir, "config.yaml"), {}, method_config), 1)
    val = data.val_index
    assert len(val) == sum(int(round(0.2 * n)) for n in np.bincount(data.train_y))
    for task, classes in ((0, range(5)), (1, range(10))):
        state = checkpoint.load(checkpoint.task_path(run_dir, 1, task))
        exemplars = state["extra"]["memory"]["exemplars"]
        memory = np.sort(np.concatenate([v.numpy() for v in exemplars.values()]))
        assert sorted(exemplars) == list(classes)
        # every class's whole pool fits the memory: it holds the pool shrunk by exactly the held-out samples
        pool = np.flatnonzero(np.isin(data.train_y, list(classes)))
        assert len(memory) == len(pool) - len(np.intersect1d(pool, val))
        assert not np.intersect1d(memory, val).size


def test_a_retest_measures_the_same_validation_accuracy(validated, tmp_path):
    run_dir = copy_run(validated, tmp_path)
    main.main(["--checkpoint_dir", run_dir])
    with open(os.path.join(run_dir, "results_retest.json")) as f:
        retested = json.load(f)["runs"][0]["tasks"]
    assert [t["val_acc"] for t in retested] == [t["val_acc"] for t in validated[1]["runs"][0]["tasks"]]


def test_without_val_split_nothing_is_recorded(finished):  # noqa: F811 (the imported fixture)
    run_dir, results = finished
    assert results["config"]["val_split"] == 0.0
    assert all("val_acc" not in t and "val_acc_per_task" not in t for t in results["runs"][0]["tasks"])
    with open(os.path.join(run_dir, "results.csv")) as f:
        assert [r["val_acc"] for r in csv.DictReader(f)] == ["", ""]
