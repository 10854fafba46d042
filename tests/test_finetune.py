"""finetune_il and finetune_normal, and the class-incremental scenario they run in (the class order, the split of
the classes into tasks).

Known answers: the CE of a step recomputed over the classes the method may see (all seen classes for class-
incremental training, the sample's own task for task-incremental, every class for joint training) on a fixed
batch, what the training data of a task holds (the new data plus the exemplars), and the class order and task
split of the data manager from their rules. The formulas are in tests/formulas.py, the builders of a method on
the digits fixture in tests/method_builders.py. The nearest-mean prediction finetune_il shares with iCaRL, UCIR and
PODNet is tested in tests/test_distillation_methods.py.

To add a method of this family, copy the test of finetune_il
(test_finetune_ce_over_the_seen_classes_or_the_samples_own_task).
"""
import os

import numpy as np
import pytest

from conftest import ROOT, known_answer
from datasets.scenario import DataManager
from formulas import ce, close, task_bounds
from method_builders import build, perturb, positions, samples, start
from methods import method_config
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config
from utils.registry import UserError


@known_answer("finetune_il")
@pytest.mark.parametrize("incre_type", ["cil", "til"])
def test_finetune_ce_over_the_seen_classes_or_the_samples_own_task(incre_type):
    method = build("finetune_il", "--incre_type", incre_type, "--memory_size", "0", "--apply_nme", "false")
    for t in range(3):
        start(method, t)
    perturb(method.network.fc, seed=1)
    x, y = samples(method, range(6))
    method.train()
    losses = method.training_step(x, y)
    z = method.network(x)["logits"]
    assert set(losses) == {"ce"} and z.shape[1] == 6
    lo, hi = (0, 6) if incre_type == "cil" else task_bounds(y)
    close(losses["ce"], ce(z, y, lo, hi))


@known_answer("finetune_normal")
def test_joint_training_is_one_task_with_ce_over_every_class():
    method = build("finetune_normal")
    assert [(t.known, t.total) for t in method.data.tasks] == [(0, 10)]
    start(method, 0)
    perturb(method.network.fc, seed=1)
    x, y = samples(method, range(10), per_class=1)
    method.train()
    losses = method.training_step(x, y)
    close(losses["ce"], ce(method.network(x)["logits"], y, 0, 10))
    with pytest.raises(UserError, match="memory_size"):
        build("finetune_normal", "--memory_size", "20")


@known_answer("finetune_il")
def test_finetune_with_memory_trains_on_the_new_data_plus_the_exemplars():
    method = build("finetune_il")
    start(method, 0)
    task = start(method, 1)
    method.memory.exemplars = {0: positions(method, [0], 4), 1: positions(method, [1], 4)}
    new = method.data.dataset("train", method.data.indices("train", [2, 3]))
    stage, = method.stages(task, new, None)
    train = stage.data()
    labels = [int(train[i][1]) for i in range(len(train))]
    assert len(train) == len(new) + 8 and labels.count(0) == 4 and labels.count(1) == 4


# ---- the scenario: class order and task split ----
@known_answer("finetune_il")
@pytest.mark.parametrize("shuffle", [True, False])
def test_class_order_follows_the_seed_when_shuffled_and_is_the_identity_otherwise(shuffle):
    from datasets import DATASETS

    cfg = load_config(os.path.join(ROOT, "options", "finetune_il", "digits.yaml"),
                      parse_cli_overrides(["--shuffle", str(shuffle).lower()]), method_config)
    raw = DATASETS.get("digits")().load("data")
    orders = {}
    for seed in (1, 2):
        data = DataManager(cfg, seed=seed)
        expected = np.random.RandomState(seed).permutation(10) if shuffle else np.arange(10)
        assert data.class_order == expected.tolist()
        # labels are remapped to positions in the class order; task t holds the labels [2t, 2t + 2)
        assert np.array_equal(np.asarray(data.class_order)[data.train_y], raw.train_y)
        assert np.array_equal(np.asarray(data.class_order)[data.test_y], raw.test_y)
        assert [(t.known, t.total) for t in data.tasks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
        orders[seed] = data.class_order
    assert (orders[1] != orders[2]) == shuffle
    pinned = load_config(None, {"method": "finetune_il", "dataset": "digits", "backbone": "resnet32",
                                "shuffle": True, "class_order_seed": 7}, method_config)
    assert DataManager(pinned, seed=1).class_order == np.random.RandomState(7).permutation(10).tolist()


@known_answer("finetune_il")
def test_tasks_split_the_classes_into_init_cls_then_increment_with_the_remainder_last():
    from datasets.scenario import split_classes

    assert split_classes(10, 2, 2) == [2, 2, 2, 2, 2]
    assert split_classes(10, 4, 3) == [4, 3, 3]
    assert split_classes(10, 3, 4) == [3, 4, 3]
    assert split_classes(10, 5, 10) == [5, 5]
    assert split_classes(10, 10, 2) == [10]
    cfg = load_config(os.path.join(ROOT, "options", "finetune_il", "digits.yaml"),
                      parse_cli_overrides(["--init_cls", "4", "--increment", "3"]), method_config)
    data = DataManager(cfg, seed=1)
    assert [(t.index, t.known, t.total, t.n_tasks) for t in data.tasks] == [(0, 0, 4, 3), (1, 4, 7, 3), (2, 7, 10, 3)]
    test = data.indices("test", [0, 5])
    assert set(data.test_y[test]) == {0, 5} and len(test) == int(np.isin(data.test_y, [0, 5]).sum())
