"""Tables and plots of a run's results: results.csv (one row per seed x task) and PNG figures (matplotlib)."""
from __future__ import annotations

import csv
import os
import warnings

import numpy as np

from trainer.checkpoint import atomic_write

#: One row per seed and task; a value a run does not record (`task_id_acc` of a method that does not route,
#: `val_acc` without `val_split`) is an empty cell.
COLUMNS = ("seed", "task", "classes_seen", "acc", "val_acc", "nme_acc", "old_acc", "new_acc", "task_id_acc", "gflops",
           "params", "train_time_s")


def write_csv(results: dict, path: str) -> None:
    """Written atomically (trainer/checkpoint.py's `atomic_write`): never through a link planted in the run folder."""
    def write(f):
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for run in results["runs"]:
            for t in run["tasks"]:
                row = {**t, "seed": run["seed"], "classes_seen": t["classes"][1]}
                writer.writerow([_cell(row.get(c)) for c in COLUMNS])

    atomic_write(path, write, "results table", binary=False)


def _cell(value):
    return "" if value is None else (round(value, 4) if isinstance(value, float) else value)


def plot(results: dict, run_dir: str, prefix: str = "") -> list[str]:
    """accuracy.png (seen-class accuracy per task, a line per seed and the mean), acc_matrix.png (mean accuracy
    matrix over seeds) and cost.png (inference GFLOPs and parameters per task). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = [r for r in results["runs"] if r["tasks"]]
    if not runs:
        return []
    metric = results["config"].get("eval_metric", "acc")
    title = f"{results['config']['method']} on {results['config']['dataset']} ({results['config']['backbone']})"
    files = []

    fig, ax = plt.subplots(figsize=(6, 4))
    n = min(len(r["tasks"]) for r in runs)
    for r in runs:
        ax.plot(range(len(r["tasks"])), [t["acc"] for t in r["tasks"]], alpha=0.4, marker=".",
                label=f"seed {r['seed']}")
    if len(runs) > 1:
        ax.plot(range(n), np.mean([[t["acc"] for t in r["tasks"][:n]] for r in runs], 0), color="black",
                linewidth=2, marker="o", label="mean")
    ax.set(xlabel="after training task", ylabel=f"{metric} on seen classes (%)", title=title, ylim=(0, 100))
    ax.set_xticks(range(n))
    ax.grid(alpha=0.3)
    ax.legend()
    files.append(_save(fig, run_dir, prefix + "accuracy.png"))

    size = min(len(r["acc_matrix"]) for r in runs)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN above the diagonal
        matrix = np.nanmean([[[np.nan if v is None else v for v in row[:size]] for row in r["acc_matrix"][:size]]
                             for r in runs], 0)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 0.6 * size), max(3.2, 1 + 0.5 * size)))
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(matrix):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set(xlabel="evaluated task j", ylabel="after training task i", title=f"{metric} (%), mean over seeds")
    ax.set_xticks(range(size))
    ax.set_yticks(range(size))
    fig.colorbar(image, ax=ax)
    files.append(_save(fig, run_dir, prefix + "acc_matrix.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    tasks = runs[0]["tasks"]
    gflops, params = [t["gflops"] for t in tasks], [t["params"] / 1e6 for t in tasks]
    left.plot(range(len(tasks)), gflops, marker="o")
    left.set(xlabel="after training task", ylabel="GFLOPs per image (fvcore)", ylim=(0, 1.2 * max(gflops)),
             title="inference cost")
    right.plot(range(len(tasks)), params, marker="o", color="tab:orange")
    right.set(xlabel="after training task", ylabel="parameters (M)", ylim=(0, 1.2 * max(params)),
              title="parameters used at test time")
    for ax in (left, right):
        ax.set_xticks(range(len(tasks)))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    files.append(_save(fig, run_dir, prefix + "cost.png"))
    return files


def _save(fig, run_dir: str, name: str) -> str:
    from matplotlib import pyplot as plt

    path = os.path.join(run_dir, name)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), "plot")
    plt.close(fig)
    return path
