"""ACL against DynaMMo's merge variants on digits, on two backbones, and the table that says when merging works.

Rows: ACL (one adapted path per task) and DynaMMo (one merged path) with every `merge_strategy` (mean is the
paper's), each with and without `finetune_merged`, plus the `adapter_init: first` variants of the merges that
assume a shared starting point. Backbones:
- "task-0-trained": `options/<method>/digits.yaml`, the resnet32 learns with the first task's adapters (two
  classes) and is frozen after;
- "self-supervised (MoCo v2)": `options/<method>/digits_pretrained.yaml`, a resnet32 pretrained by MoCo v2 on the
  digits' training images without labels (`options/moco_v2/digits.yaml`, run first when its file is missing) and
  frozen;
- "self-supervised (SimSiam)": the same with the SimSiam backbone of `options/simsiam/digits.yaml`, a weaker one
  (nearest-class-mean accuracy of its features 64% against MoCo v2's 90%), to show what merging needs.
Every run is `python main.py --config ... --seed S` in a subprocess with OMP_NUM_THREADS=1; ACL and DynaMMo of a
seed share the class order, the memory and (the test suite checks it) every task adapter, so the comparison is
paired. Writes into the output folder (default benchmarks/out/, git-ignored): `logs/` (the runs),
`dynammo_merging.csv` (a row per run), `dynammo_merging.md` (mean ± sample std (n - 1) over seeds of last
accuracy, average incremental accuracy, task-id accuracy, inference GFLOPs and parameters after the last task,
and the issue's checks; its header says what ran the runs, from their results.json: CPU model, precision and fast
paths, or each distinct environment if they do not share one) and `dynammo_merging.png` (last accuracy against
GFLOPs, sample std error bars).

    python -m benchmarks.tables.dynammo_merging [--out benchmarks/out] [--seeds 1 2 3] [--jobs 1] [--reuse]
                                                [--backbones task0 ssl] [--variants acl "dynammo mean" ...]
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.environment import common, of_runs
from benchmarks.run import ROOT, RunFailed, finished_run, run_config
from trainer.metrics import format_mean_std, mean_std

#: key -> (label, config file, overrides, pretraining config writing the file the runs load, that file)
BACKBONES = {
    "task0": ("task-0-trained", "digits.yaml", [], None, None),
    "ssl": ("self-supervised (MoCo v2)", "digits_pretrained.yaml", [], "options/moco_v2/digits.yaml",
            "pretrained/moco_v2_digits_resnet32.pth"),  # what digits_pretrained.yaml read
    "simsiam": ("self-supervised (SimSiam)", "digits_pretrained.yaml",
                ["--pretrain_path", "pretrained/simsiam_digits_resnet32.pth"], "options/simsiam/digits.yaml",
                "pretrained/simsiam_digits_resnet32.pth"),
}


def variants() -> list[tuple[str, str, list[str]]]:
    """(label, method, overrides) of every row."""
    rows = [("acl", "acl", [])]
    for strategy in ("mean", "task_arithmetic", "ties", "magmax"):
        for finetune in (False, True):
            rows.append((f"dynammo {strategy}" + (" + finetune" if finetune else ""), "dynammo",
                         ["--merge_strategy", strategy, "--finetune_merged", str(finetune).lower()]))
    for strategy in ("mean", "ties"):
        rows.append((f"dynammo {strategy}, init first", "dynammo",
                     ["--merge_strategy", strategy, "--adapter_init", "first"]))
    return rows


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def run_one(backbone: str, label: str, method: str, overrides: list[str], seed: str, log_root: str,
            reuse: bool) -> dict:
    """One seed of one row; returns its metrics (or the error)."""
    label_b, config_file, backbone_overrides = BACKBONES[backbone][:3]
    config = os.path.join("options", method, config_file)
    overrides = [*backbone_overrides, *overrides]
    note = f"{backbone}_{slug(label)}_seed{seed}"
    argv = ["--config", config, "--seed", seed, "--device", "cpu", "--note", note, "--save_models", "false",
            *overrides]
    row = {"backbone": label_b, "variant": label, "seed": int(seed),
           "command": " ".join(["python", "main.py", "--config", config, "--seed", seed, *overrides]),
           "all_seeds": " ".join(["python", "main.py", "--config", config, "--seed", "{seeds}", *overrides])}
    found = finished_run(log_root, note) if reuse else None
    if found is None:
        folder = os.path.join(log_root, method, "digits", "resnet32_b2i2", note)
        if os.path.isdir(folder):  # an unfinished or an old run of this name: start afresh, under the same name
            shutil.rmtree(folder)
        try:
            found = run_config(argv, log_root=log_root, threads=1)
        except RunFailed as err:
            return {**row, "error": str(err)}
    run = found[0]["runs"][0]
    last = run["tasks"][-1]
    print(f"{row['backbone']:>16} | {label:<32} seed {seed}: last {run['last_acc']:.2f}", flush=True)
    return {**row, "last_acc": run["last_acc"], "avg_incremental_acc": run["avg_incremental_acc"],
            "task_id_acc": last.get("task_id_acc"), "gflops": last["gflops"], "params": last["params"],
            "environment": run.get("environment") or [None]}


def ensure_pretrained(backbone: str) -> str | None:
    """A self-supervised backbone: run its pretraining config when the file it writes is missing. Returns a
    sentence on where the file came from (what ran its pretraining, when it ran here), None for no file."""
    config, path = BACKBONES[backbone][3:]
    if config is None:
        return None
    if os.path.isfile(os.path.join(ROOT, path)):
        return f"{path}: an existing file (what pretrained it is not recorded here)"
    print(f"{path} is missing: python main.py --config {config}", flush=True)
    results, _ = run_config(["--config", config, "--device", "cpu"], log_root=os.path.join(ROOT, "logs", "pretrain"),
                            threads=1)
    return f"{path}: pretrained by this command, {common(of_runs(results))}"


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and sample std over seeds (trainer.metrics.mean_std) per (backbone, variant), in the order the runs
    came."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["backbone"], r["variant"]), []).append(r)
    table = []
    for (backbone, variant), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        table.append({"backbone": backbone, "variant": variant, "seeds": len(ok),
                      "errors": [r["error"] for r in rs if "error" in r],
                      **{k: mean_std([r[k] for r in ok]) for k in
                         ("last_acc", "avg_incremental_acc", "task_id_acc", "gflops", "params")}})
    return table


def checks(table: list[dict]) -> list[str]:
    """The issue's done-means, evaluated on the table."""
    lines = []
    for backbone, merged_margin, best_margin in ((BACKBONES["ssl"][0], 3.0, 1.0), (BACKBONES["task0"][0], None, 3.0)):
        rows = {r["variant"]: r for r in table if r["backbone"] == backbone and r["last_acc"]["mean"] is not None}
        if "acl" not in rows:
            continue
        acl = rows["acl"]["last_acc"]["mean"]
        dyn = {v: r["last_acc"]["mean"] for v, r in rows.items() if v.startswith("dynammo")}
        if not dyn:
            continue
        best = max(dyn, key=dyn.get)
        if merged_margin is not None and "dynammo mean" in dyn:
            gap = acl - dyn["dynammo mean"]
            lines.append(f"- {backbone}: DynaMMo's mean merge {dyn['dynammo mean']:.2f} vs ACL {acl:.2f} "
                         f"(gap {gap:.2f}; within {merged_margin:g}: {'yes' if gap <= merged_margin else 'no'})")
        lines.append(f"- {backbone}: best one-pass variant '{best}' {dyn[best]:.2f} vs ACL {acl:.2f} "
                     f"(at or above ACL - {best_margin:g}: {'yes' if dyn[best] >= acl - best_margin else 'no'})")
    return lines


def shown_args() -> list[str]:
    """This command's arguments without --out and its folder (a path of this machine)."""
    argv = sys.argv[1:]
    return [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]


def write_outputs(out: str, runs: list[dict], seeds: list[str], jobs: int, pretrained: list[str]) -> str:
    fields = ["backbone", "variant", "seed", "last_acc", "avg_incremental_acc", "task_id_acc", "gflops", "params",
              "command", "error"]
    with open(os.path.join(out, "dynammo_merging.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in runs:
            writer.writerow({k: r.get(k) for k in fields})
    table = summarise(runs)
    environment = common([e for r in runs if "error" not in r for e in r["environment"]])
    lines = ["# DynaMMo's merges against ACL on digits", "",
             f"Generated by `python -m benchmarks.tables.dynammo_merging {shlex.join(shown_args())}` "
             f"({time.strftime('%Y-%m-%d')}, {jobs} run{'' if jobs == 1 else 's'} at a time; {environment}"
             + "".join(f"; {p}" for p in pretrained) + "). scikit-learn digits, 5 "
             "tasks of 2 classes, class order shuffled by each seed, 200-sample herding memory, resnet32 at 8 px. "
             "Mean ± sample std (n - 1) over seeds; accuracies in %; "
             "\"last\" is the accuracy on all classes after the last task, \"task id\" the share of test samples "
             "routed to their own task's head after it; GFLOPs (fvcore multiply-adds per image) and params are "
             "those of the test-time forward after the last task. Backbones: task-0-trained "
             "(`options/<method>/digits.yaml`: learnt with the first task's adapters, then frozen), "
             "self-supervised (MoCo v2) (`options/<method>/digits_pretrained.yaml`: MoCo v2 on the training images "
             "without labels, `options/moco_v2/digits.yaml`, frozen) and self-supervised (SimSiam) (the same with "
             "`options/simsiam/digits.yaml`'s backbone, a weaker one: its features classify the test digits at 64% "
             "by nearest class mean, MoCo v2's at 90%).", "",
             "| backbone | variant | last acc | avg incremental acc | task-id acc | GFLOPs | params (M) |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        if r["last_acc"]["mean"] is None:
            lines.append(f"| {r['backbone']} | {r['variant']} | failed: {'; '.join(r['errors'])} | | | | |")
            continue
        lines.append(f"| {r['backbone']} | {r['variant']} | {format_mean_std(r['last_acc'])} | "
                     f"{format_mean_std(r['avg_incremental_acc'])} | {format_mean_std(r['task_id_acc'])} | "
                     f"{r['gflops']['mean']:.4f} | {r['params']['mean'] / 1e6:.3f} |")
    lines += ["", "Checks (issue 12):", "", *checks(table), "", "Commands (each seed is run on its own):", ""]
    for r in {r["all_seeds"]: r for r in runs}.values():
        lines.append(f"- {r['backbone']}, {r['variant']}: `{r['all_seeds'].format(seeds=' '.join(seeds))}`")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "dynammo_merging.md"), "w") as f:
        f.write(text)
    plot(table, os.path.join(out, "dynammo_merging.png"), environment.removeprefix("every run: "))
    return text


def plot(table: list[dict], path: str, environment: str) -> None:
    """Last accuracy against GFLOPs per backbone, sample std error bars; `environment` (precision, CPU) on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [b[0] for b in BACKBONES.values() if any(r["backbone"] == b[0] for r in table)]
    width = 5 * len(present) + 3  # 3 inches on the right for the legend
    fig, axes = plt.subplots(1, len(present), figsize=(width, 5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, backbone in zip(axes, present):
        rows = [r for r in table if r["backbone"] == backbone and r["last_acc"]["mean"] is not None]
        for r in rows:
            marker = "s" if r["variant"] == "acl" else ("o" if "finetune" in r["variant"] else "^")
            ax.errorbar(r["gflops"]["mean"], r["last_acc"]["mean"], yerr=r["last_acc"]["std"] or 0, fmt=marker,
                        capsize=3, label=r["variant"])
        ax.set_xscale("log")
        ax.set_xlabel("inference GFLOPs per image after the last task (log scale)")
        ax.set_title(f"{backbone} backbone")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("last accuracy (%), mean ± sample std over seeds")
    handles, labels = axes[-1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(environment, 12 * width)), fontsize=8)
    fig.subplots_adjust(left=0.9 / width, right=1 - 3 / width, top=0.84, wspace=0.1)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"), help="output folder")
    parser.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each on one CPU thread)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--variants", nargs="+", help="only these rows (labels as in the table)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in the output folder")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    rows = [v for v in variants() if not args.variants or v[0] in args.variants]
    if not rows:
        parser.error(f"no variant matches {args.variants}; labels: {', '.join(v[0] for v in variants())}")
    pretrained = [p for p in map(ensure_pretrained, args.backbones) if p]
    todo = [(b, *row, seed) for b in args.backbones for row in rows for seed in args.seeds]
    log_root = os.path.join(out, "logs")
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda t: run_one(*t, log_root, args.reuse), todo))
    text = write_outputs(out, runs, args.seeds, args.jobs, pretrained)
    print(text)
    return text


if __name__ == "__main__":
    main()
