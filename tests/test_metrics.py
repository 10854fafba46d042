"""Metrics against hand-computed matrices."""
import numpy as np
import pytest

from utils import metrics

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


def test_mean_std_over_seeds():
    assert metrics.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0}
