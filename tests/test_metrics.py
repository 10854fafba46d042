"""Metrics against hand-computed matrices."""
import math

import numpy as np
import pytest

from trainer import metrics

# A[i][j]: accuracy on task j after task i.
ROWS = [[90.0], [70.0, 80.0], [60.0, 50.0, 100.0]]
TOTALS = [90.0, 75.0, 70.0]


def test_accuracy_matrix_is_lower_triangular():
    m = metrics.accuracy_matrix(ROWS)
    assert m.shape == (3, 3) and np.isnan(m[0, 1]) and m[2, 1] == 50.0


def test_forgetting_is_best_earlier_minus_final():
    # task 0: best earlier max(90, 70) = 90, final 60 -> 30; task 1: best earlier 80, final 50 -> 30
    assert metrics.forgetting(metrics.accuracy_matrix(ROWS)) == pytest.approx(30.0)
    assert metrics.forgetting(metrics.accuracy_matrix([[50.0]])) == 0.0


def test_forgetting_uses_the_best_not_the_first_accuracy():
    rows = [[50.0], [80.0, 90.0], [40.0, 90.0, 70.0]]
    # task 0: max(50, 80) - 40 = 40; task 1: 90 - 90 = 0
    assert metrics.forgetting(metrics.accuracy_matrix(rows)) == pytest.approx(20.0)


def test_bwt_is_final_minus_just_learned():
    # (60 - 90) and (50 - 80) -> mean -30
    assert metrics.backward_transfer(metrics.accuracy_matrix(ROWS)) == pytest.approx(-30.0)


def test_summary_numbers():
    s = metrics.summarize(TOTALS, ROWS)
    assert s["avg_incremental_acc"] == pytest.approx(235 / 3)
    assert s["last_acc"] == 70.0
    assert s["acc_matrix"][0] == [90.0, None, None]


def test_score_acc_and_mean_class_recall():
    y = np.array([0, 0, 0, 1])
    p = np.array([0, 0, 1, 0])
    assert metrics.score(y, p, "acc") == pytest.approx(50.0)
    # recall class 0 = 2/3, class 1 = 0 -> mean 1/3
    assert metrics.score(y, p, "mcr") == pytest.approx(100 / 3)


def test_task_scores_group_by_task_ranges():
    y = np.array([0, 1, 2, 3, 3])
    p = np.array([0, 0, 2, 3, 1])
    assert metrics.task_scores(y, p, [(0, 2), (2, 4)]) == pytest.approx([50.0, 200 / 3])


def test_mean_std_over_seeds_is_the_sample_std():
    assert metrics.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}


def test_forgetting_and_bwt_on_a_second_matrix():
    rows = [[80.0], [60.0, 90.0], [70.0, 40.0, 95.0], [50.0, 85.0, 30.0, 99.0]]
    m = metrics.accuracy_matrix(rows)
    # best earlier accuracy (rows 0..2) minus final: task 0 80 - 50, task 1 90 - 85, task 2 95 - 30
    assert metrics.forgetting(m) == pytest.approx((30 + 5 + 65) / 3)
    # final minus just-learnt: (50 - 80) + (85 - 90) + (30 - 95)
    assert metrics.backward_transfer(m) == pytest.approx((-30 - 5 - 65) / 3)
    # two tasks: the single old task
    two = metrics.accuracy_matrix([[80.0], [60.0, 90.0]])
    assert metrics.forgetting(two) == pytest.approx(20.0) and metrics.backward_transfer(two) == pytest.approx(-20.0)
    # an old task that improves: no forgetting, positive transfer
    up = metrics.accuracy_matrix([[50.0], [70.0, 90.0]])
    assert metrics.forgetting(up) == pytest.approx(-20.0) and metrics.backward_transfer(up) == pytest.approx(20.0)


def test_summary_holds_forgetting_bwt_and_the_last_row():
    s = metrics.summarize([90.0, 75.0, 70.0], ROWS)
    assert s["forgetting"] == pytest.approx(30.0) and s["bwt"] == pytest.approx(-30.0)
    assert s["acc_matrix"][2] == [60.0, 50.0, 100.0] and s["acc_matrix"][1] == [70.0, 80.0, None]
    assert metrics.average_incremental_accuracy([10.0, 20.0, 60.0]) == pytest.approx(30.0)


def test_mean_std_is_the_sample_std_and_skips_missing_values():
    out = metrics.mean_std([1.0, 2.0, 3.0, 4.0, None])
    assert out["mean"] == pytest.approx(2.5) and out["std"] == pytest.approx(math.sqrt(5.0 / 3)) and out["n"] == 4
    assert metrics.mean_std([7.0]) == {"mean": 7.0, "std": None, "n": 1}  # one seed: no spread to report
    assert metrics.mean_std([None]) == {"mean": None, "std": None, "n": 0}
    assert metrics.format_mean_std(metrics.mean_std([1.0, 3.0])) == "2.00 ± 1.41"
    assert metrics.format_mean_std(metrics.mean_std([7.0])) == "7.00" and metrics.format_mean_std(None) == "-"


def test_mean_class_recall_weights_every_class_alike():
    y = np.array([0] * 8 + [1] * 2)
    p = np.array([0] * 8 + [0, 1])
    assert metrics.score(y, p, "acc") == pytest.approx(90.0)
    assert metrics.score(y, p, "mcr") == pytest.approx(75.0)  # (100 + 50) / 2
    assert math.isnan(metrics.score(np.array([]), np.array([]), "acc"))


# ---- the evaluation of a task (trainer/evaluation.py) on a method with fixed scores ----
class _Data:
    """Test pool: 3 tasks of 2 classes, 4 samples per class; sample i is the image holding the number i."""

    def __init__(self):
        from utils.types import Task

        self.tasks = [Task(t, 2 * t, 2 * t + 2, 3) for t in range(3)]
        self.test_y = np.repeat(np.arange(6), 4)
        self.n_classes = 6

    def class_of_task(self):
        return np.repeat(np.arange(3), 2)

    def indices(self, split, classes):
        return np.flatnonzero(np.isin(self.test_y, list(classes)))

    def dataset(self, split, indices, augment=None):
        import torch
        from torch.utils.data import TensorDataset

        return TensorDataset(torch.as_tensor(indices, dtype=torch.float32)[:, None],
                             torch.as_tensor(self.test_y[indices]))


class _Fixed:
    """predict(x): the row of `table` of each sample number, plus a routed task."""

    def __new__(cls, table, task_id=None):
        import torch
        from torch import nn

        class Method(nn.Module):
            record = "cnn"

            def predict(self, x):
                i = x[:, 0].long()
                out = {"cnn": torch.as_tensor(table, dtype=torch.float32)[i]}
                if task_id is not None:
                    out["task_id"] = torch.as_tensor(task_id)[i]
                return out

            def openset_confidence(self, scores):
                return scores["cnn"].max(1).values

        return Method()


def _config(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"incre_type": "cil", "eval_metric": "acc", "save_pred_record": False, **kw})


def test_evaluation_scores_per_task_old_new_and_task_id():
    import torch

    from trainer.evaluation import evaluate
    from trainer.engine.engine import Engine

    data = _Data()
    y = data.test_y[:16]  # after task 1: classes 0..3
    pred = y.copy()
    pred[[0, 1, 2]] = [1, 2, 3]  # class 0: 1 of 4 right (one into task 0's other class, two into task 1)
    pred[8] = 0  # class 2: 3 of 4 right
    alt = y.copy()
    alt[1] = 1  # the second-best class, which decides among a task's own classes (til)
    table = np.eye(4)[pred] + 0.5 * np.eye(4)[alt]
    routed = np.repeat([0, 1], 8)
    routed[[3, 12]] = [1, 0]
    method = _Fixed(table, routed)
    result = evaluate(method, Engine(torch.device("cpu")), data, data.tasks[1], _config())
    cnn = result["cnn"]
    assert cnn["acc"] == pytest.approx(100 * 12 / 16)
    assert cnn["acc_per_task"] == pytest.approx([100 * 5 / 8, 100 * 7 / 8])
    assert cnn["old_acc"] == pytest.approx(100 * 5 / 8) and cnn["new_acc"] == pytest.approx(100 * 7 / 8)
    assert result["task_id_acc"] == pytest.approx(100 * 14 / 16)
    # til: every sample is predicted among its own task's classes only (samples 1 and 0 stay wrong)
    til = evaluate(_Fixed(table), Engine(torch.device("cpu")), data, data.tasks[1], _config(incre_type="til"))
    assert til["cnn"]["acc_per_task"] == pytest.approx([100 * 6 / 8, 100 * 8 / 8])


def test_openset_scores_rank_seen_classes_above_later_ones():
    import torch

    from trainer.evaluation import openset_scores
    from trainer.engine.engine import Engine

    data = _Data()
    confident = np.where(data.test_y[:, None] < 4, 0.9, 0.2) * np.ones((1, 4))  # known: classes 0..3
    result = openset_scores(_Fixed(confident), Engine(torch.device("cpu")), data, data.tasks[1])
    assert result["auroc"] == pytest.approx(100.0) and result["ap"] == pytest.approx(100.0)
    assert result["fpr95"] == pytest.approx(0.0)
    wrong = openset_scores(_Fixed(1 - confident), Engine(torch.device("cpu")), data, data.tasks[1])
    assert wrong["auroc"] == pytest.approx(0.0) and wrong["fpr95"] == pytest.approx(100.0)
    assert openset_scores(_Fixed(confident), Engine(torch.device("cpu")), data, data.tasks[2]) is None


def test_run_record_and_summary_over_seeds():
    from trainer.results import add_task, summary

    def entry(task, acc, per_task, cnn, nme, gflops, seconds):
        return {"task": task, "acc": acc, "acc_per_task": per_task, "cnn_acc": cnn, "nme_acc": nme,
                "gflops": gflops, "params": 100 + task, "train_time_s": seconds}

    runs = []
    for shift in (0.0, 10.0):
        record = {"seed": 1, "tasks": []}
        add_task(record, entry(0, 90.0 - shift, [90.0 - shift], 80.0, 85.0, 0.1, 5.0))
        add_task(record, entry(1, 70.0 - shift, [60.0 - shift, 80.0], 60.0, 65.0, 0.2, 7.0))
        runs.append(record)
    first = runs[0]
    assert first["last_acc"] == 70.0 and first["avg_incremental_acc"] == pytest.approx(80.0)
    assert first["forgetting"] == pytest.approx(30.0) and first["bwt"] == pytest.approx(-30.0)
    assert first["last_cnn_acc"] == 60.0 and first["last_nme_acc"] == 65.0
    assert first["avg_incremental_nme_acc"] == pytest.approx(75.0)
    s = summary(runs)
    assert s["last_acc"] == {"mean": 65.0, "std": pytest.approx(math.sqrt(50.0)), "n": 2}  # 70 and 60: sample std
    assert s["final_gflops"]["mean"] == pytest.approx(0.2) and s["final_params"]["mean"] == 101
    assert s["train_time_s"]["mean"] == pytest.approx(12.0)
