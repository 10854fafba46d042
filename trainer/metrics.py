"""Continual-learning metrics, each defined once. Accuracies are in percent.

Notation: A[i][j] = accuracy on the classes of task j after training task i (j <= i; NaN above the diagonal),
A^i = accuracy on all classes seen after task i, T = number of tasks trained so far.
"""
from __future__ import annotations

import numpy as np


def score(y_true: np.ndarray, y_pred: np.ndarray, metric: str = "acc") -> float:
    """acc: 100 * mean(y_pred == y_true); mcr (mean class recall): 100 * mean over the classes present in
    y_true of recall_c = |{y_pred = c, y_true = c}| / |{y_true = c}|. NaN on an empty set."""
    if len(y_true) == 0:
        return float("nan")
    if metric == "acc":
        return float(100.0 * np.mean(y_pred == y_true))
    if metric == "mcr":
        from sklearn.metrics import recall_score

        labels = np.unique(y_true)
        return float(100.0 * recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    raise ValueError(f"unknown eval_metric '{metric}'")


def task_scores(y_true, y_pred, bounds: list[tuple[int, int]], metric: str = "acc") -> list[float]:
    """Score restricted to the samples whose true class lies in each task's [known, total) range."""
    return [score(y_true[(y_true >= lo) & (y_true < hi)], y_pred[(y_true >= lo) & (y_true < hi)], metric)
            for lo, hi in bounds]


def accuracy_matrix(rows: list[list[float]]) -> np.ndarray:
    """Square matrix from the per-task rows A[i][0..i]; entries j > i are NaN."""
    n = len(rows)
    matrix = np.full((n, n), np.nan)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix


def average_incremental_accuracy(totals: list[float]) -> float:
    """(1/T) * sum_i A^i  (Rebuffi et al. 2017; CODA's "CAA")."""
    return float(np.mean(totals))


def forgetting(matrix: np.ndarray) -> float:
    """Average forgetting (Chaudhry et al. 2018): (1/(T-1)) * sum_{j<T-1} (max_{k<T-1} A[k][j] - A[T-1][j]).
    0 for a single task."""
    t = matrix.shape[0] - 1
    if t == 0:
        return 0.0
    best = np.nanmax(matrix[:t, :t], axis=0)
    return float(np.mean(best - matrix[t, :t]))


def backward_transfer(matrix: np.ndarray) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): (1/(T-1)) * sum_{j<T-1} (A[T-1][j] - A[j][j]); negative = forgetting.
    0 for a single task. (The original code and its README each use another, differing formula.)"""
    t = matrix.shape[0] - 1
    if t == 0:
        return 0.0
    return float(np.mean(matrix[t, :t] - np.diag(matrix)[:t]))


def summarize(totals: list[float], rows: list[list[float]]) -> dict:
    matrix = accuracy_matrix(rows)
    return {
        "acc_matrix": [[None if np.isnan(v) else round(float(v), 4) for v in r] for r in matrix],
        "avg_incremental_acc": average_incremental_accuracy(totals),
        "last_acc": float(totals[-1]),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
    }


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1: the seeds are a sample) over the values that are not None, and
    their number n; the std is None for fewer than two values (one seed says nothing of the spread)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(arr):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None, "n": len(arr)}


def format_mean_std(stat: dict | None, digits: int = 2) -> str:
    """'mean ± std' (sample std), or just the mean for one seed, '-' for none."""
    if not stat or stat.get("mean") is None:
        return "-"
    mean = f"{stat['mean']:.{digits}f}"
    return mean if stat.get("std") is None else f"{mean} ± {stat['std']:.{digits}f}"
