"""Compare every method on digits at one common budget; write docs/results.md and docs/results.png (both are
generated, never typed by hand).

Every row runs `python main.py --config options/<method>/digits.yaml --seed 1 2 3` plus the budget below as
command-line overrides (so a method's yaml cannot step outside it), one run at a time, each on one CPU thread,
and reads its results.json: mean ± sample std (n - 1) over the seeds of last accuracy, average incremental
accuracy and forgetting, the inference GFLOPs and parameters after the last task, and the training wall time per
seed. The header says what ran the runs, from their results.json: the CPU model, the precision (bfloat16 autocast
on a CPU with native bfloat16, float32 elsewhere) and the fast paths, listing each distinct environment if the
runs do not share one; what else the machine ran meanwhile (which the runs cannot know, and which slows the wall
times) is `--conditions`.
A method's own hyper-parameters (learning rate, loss weights, its extra stages) come from its yaml; the optimiser
of each row is printed beside it. The prompt methods run on a ViT, as their papers do, in a table of their own.

    python -m benchmarks.tables.compare_methods [--seeds 1 2 3] [--methods icarl wa ...] [--reuse]
                                                [--out docs/results.md] [--conditions TEXT] [--merging FILE]

Without `--merging`, the DynaMMo section already in `--out` (benchmarks.tables.dynammo_merging's) is kept, and so
is always the pretrained-backbone section (benchmarks.tables.pretrained_cil's).
"""
from __future__ import annotations

import argparse
import os
import textwrap
import time

from benchmarks.environment import common, of_runs
from benchmarks.run import ROOT, RunFailed, finished_run, run_config
from benchmarks.tables.pretrained_cil import TITLE as PRETRAINED_TITLE
from trainer.metrics import format_mean_std

# The common budget of the CNN table (digits, resnet32 / cosine_resnet32 from scratch).
CNN_BUDGET = {"img_size": 16, "init_epochs": 5, "epochs": 5, "batch_size": 32, "memory_size": 200,
              "fixed_memory": False, "shuffle": True, "init_cls": 2, "increment": 2}
# GEM's paper keeps a fixed episodic memory per task: 20 per class, i.e. 200 after the last task.
ROW_EXTRA = {"gem": {"fixed_memory": True, "memory_per_class": 20}}
# The prompt methods: a frozen tiny ViT (random weights: nothing to download), no memory (rehearsal-free).
VIT_BUDGET = {"img_size": 16, "init_epochs": 5, "epochs": 5, "batch_size": 32, "memory_size": 0,
              "shuffle": True, "init_cls": 2, "increment": 2}
BUDGET_TEXT = {
    "cnn": ("scikit-learn digits, 5 tasks of 2 classes, the class order shuffled by each seed (the same order for "
            "every method), images at {img_size} px, {epochs} epochs per task (every stage of a method's main "
            "training; a method's extra stages, such as a class-balanced or bias-correction stage, are its own and "
            "counted in its wall time), batch {batch_size}, a replay memory of {memory_size} samples in all "
            "(split over the seen classes, each method's own selection; none for the rehearsal-free rows; GEM keeps "
            "20 per class, its paper's fixed per-task episodic memory, so at most 200), networks trained from scratch, SGD for every method (with "
            "momentum 0.9, weight decay 5e-4 and a cosine schedule, except GEM, whose projection needs plain SGD)."),
    "vit": ("scikit-learn digits, 5 tasks of 2 classes, the same class orders, a frozen vit_tiny_patch16_224 with "
            "random weights at {img_size} px (one patch per image), {epochs} epochs per task, batch {batch_size}, "
            "no replay memory, Adam. The numbers say little about the methods, which need pretrained features; "
            "they show the methods run and how their costs compare."),
}
BASELINES = [("finetune_il, no memory (lower bound)", "finetune_il", {"memory_size": 0, "apply_nme": False}),
             ("finetune_il + replay", "finetune_il", {}),
             ("finetune_normal (joint training, upper bound)", "finetune_normal", {"memory_size": 0})]
# Methods whose premise is a frozen pretrained network, classified in closed form: on a random ResNet-32 their rows
# would measure nothing of them; they are in the pretrained-backbone table (benchmarks.tables.pretrained_cil).
PRETRAINED_ONLY = ("simplecil", "aper", "ranpac")
SHORT = {BASELINES[0][0]: "finetune, no memory", BASELINES[1][0]: "finetune + replay", BASELINES[2][0]: "joint"}


def _config(method: str, overrides: list[str]):
    from methods import method_config
    from trainer.cli import parse_overrides
    from trainer.config_loader import load_config

    return load_config(os.path.join(ROOT, "options", method, "digits.yaml"), parse_overrides(overrides), method_config)


def _argv(budget: dict) -> list[str]:
    return [a for k, v in budget.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def rows(methods: list[str] | None) -> list[dict]:
    """Every row: label, method, table ("cnn" or "vit") and the command-line overrides (budget + row's own)."""
    from methods import METHODS

    out = []
    candidates = [(label, m, extra) for label, m, extra in BASELINES] if methods is None else []
    names = methods or [m for m in METHODS.keys() if m not in ("finetune_il", "finetune_normal", *PRETRAINED_ONLY)
                        and METHODS.meta(m)["method_type"] == "multi_steps"]
    candidates += [(m, m, {}) for m in names if os.path.isfile(os.path.join(ROOT, "options", m, "digits.yaml"))]
    for label, method, extra in candidates:
        table = "vit" if "vit" in _config(method, []).backbone else "cnn"
        if table == "cnn" and METHODS.get(method).replay == "none" and "memory_size" not in extra:
            extra = {"memory_size": 0, **extra}  # rehearsal-free (LwF, EWC): they refuse the budget's memory
        overrides = _argv({**(CNN_BUDGET if table == "cnn" else VIT_BUDGET), **ROW_EXTRA.get(method, {}), **extra})
        out.append({"label": label, "method": method, "table": table, "overrides": overrides})
    return out


def _optimiser(cfg) -> str:
    name = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[cfg.opt_type]
    parts = [f"{name} lr {cfg.lrate:g}"]
    if cfg.opt_type == "sgd":
        parts.append(f"momentum {cfg.opt_mom:g}")
    if cfg.weight_decay:
        parts.append(f"wd {cfg.weight_decay:g}")
    if cfg.scheduler:
        parts.append(cfg.scheduler)
    return ", ".join(parts)


def run_row(row: dict, seeds: list[str], log_root: str, reuse: bool) -> dict:
    """One row: its run on one thread in a subprocess (or, with `reuse`, its finished run under `log_root`)."""
    method, overrides = row["method"], row["overrides"]
    note = method + ("_nomem" if "no memory" in row["label"] else "")
    config = ["--config", f"options/{method}/digits.yaml"]
    argv = [*config, "--seed", *seeds, "--device", "cpu", "--note", note, *overrides]
    shown = " ".join(["python", "main.py", *config, "--seed", *seeds, *overrides])
    found = finished_run(log_root, note) if reuse else None
    if found is None:
        print(f"running {row['label']}: {shown}", flush=True)
        start = time.perf_counter()
        try:
            found = run_config(argv, log_root=log_root, threads=1)
        except RunFailed as err:
            return {**row, "error": str(err), "cmd": shown}
        finally:
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    results = found[0]
    return {**row, "summary": results["summary"], "cmd": shown, "optimiser": _optimiser(_config(method, overrides)),
            "environments": of_runs(results)}


def table(done: list[dict]) -> list[str]:
    lines = ["| method | last acc | avg incremental acc | forgetting | last NME acc | GFLOPs | params (M) | "
             "train time (s) | optimiser |", "|---|---|---|---|---|---|---|---|---|"]
    for r in done:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | | | |")
            continue
        s = r["summary"]
        stats = " | ".join(format_mean_std(s.get(k)) for k in ("last_acc", "avg_incremental_acc", "forgetting",
                                                                "last_nme_acc"))
        lines.append(f"| {r['label']} | {stats} | {s['final_gflops']['mean']:.4f} | "
                     f"{s['final_params']['mean'] / 1e6:.3f} | {s['train_time_s']['mean']:.0f} | {r['optimiser']} |")
    return lines


def _memory_size(row: dict) -> int:
    overrides = row["overrides"]
    return int(overrides[overrides.index("--memory_size") + 1])


def targets(done: list[dict]) -> list[str]:
    """The acceptance checks of the comparison (issue 11), evaluated on this table."""
    last = {r["label"]: r["summary"]["last_acc"] for r in done if "summary" in r}
    lower, replay = last.get(BASELINES[0][0]), last.get(BASELINES[1][0])
    if lower is None or replay is None:
        return []
    memory = [r["label"] for r in done if r["table"] == "cnn" and _memory_size(r) > 0 and r["label"] in last]
    checks = [(f"every replay method (a memory > 0) >= the no-memory lower bound + 50 ({lower['mean'] + 50:.2f})",
               all(last[m]["mean"] >= lower["mean"] + 50 for m in memory),
               ", ".join(f"{m} {last[m]['mean']:.2f}" for m in memory if last[m]["mean"] < lower["mean"] + 50))]
    if "gem" in last:
        checks.append((f"GEM within 5 points of finetune + replay ({replay['mean']:.2f})",
                       last["gem"]["mean"] >= replay["mean"] - 5, f"gem {last['gem']['mean']:.2f}"))
    if "bic" in last and "wa" in last:
        checks.append((f"BiC >= WA - 2 ({last['wa']['mean'] - 2:.2f})", last["bic"]["mean"] >= last["wa"]["mean"] - 2,
                       f"bic {last['bic']['mean']:.2f}"))
    for m in ("lwf", "ewc"):  # rehearsal-free: between the two finetune baselines
        if m in last:
            checks.append((f"{m} between finetune without and with replay ({lower['mean']:.2f}, {replay['mean']:.2f})",
                           lower["mean"] <= last[m]["mean"] <= replay["mean"], f"{m} {last[m]['mean']:.2f}"))
    if "podnet" in last and last["podnet"]["std"] is not None:
        checks.append(("PODNet's sample std over seeds <= 4", last["podnet"]["std"] <= 4,
                       f"std {last['podnet']['std']:.2f}"))
    return [f"- {'met' if ok else 'NOT met'}: {text}" + ("" if ok or not why else f" ({why})")
            for text, ok, why in checks]


def plot(done: list[dict], path: str, environment: str) -> None:
    """Last accuracy against inference GFLOPs, one point per method with the sample std over seeds as error bars
    (none for one seed); `environment` (precision and CPU) under the title."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"cnn": ("o", "ResNet-32 methods (common budget)"), "vit": ("s", "prompt methods (frozen ViT)")}
    for kind, (marker, label) in styles.items():
        points = [r for r in done if "summary" in r and r["table"] == kind]
        if not points:
            continue
        x = [r["summary"]["final_gflops"]["mean"] for r in points]
        y = [r["summary"]["last_acc"]["mean"] for r in points]
        err = [r["summary"]["last_acc"]["std"] or 0 for r in points]
        ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=label)
        for r, xi, yi in zip(points, x, y):
            ax.annotate(SHORT.get(r["label"], r["label"]), (xi, yi), textcoords="offset points", xytext=(5, -3),
                        fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="inference GFLOPs per image after the last task (fvcore, log scale)",
           ylabel="last accuracy (%), mean ± sample std over seeds", ylim=(0, 102))
    ax.set_title("digits, 5 tasks of 2 classes: accuracy against inference cost\n"
                 + "\n".join(textwrap.wrap(environment, 110)), fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


MERGING_TITLE = "## DynaMMo's merge strategies against ACL"


def kept(path: str, title: str) -> list[str]:
    """The section `title` of the markdown file `path` as it stands (up to the next '## ' title), [] if none."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        _, found, after = f.read().partition(title)
    return ["", title + after.split("\n## ", 1)[0].rstrip("\n")] if found else []


def merging(args) -> list[str]:
    """The section of benchmarks.tables.dynammo_merging's table (as it wrote it), its PNG copied beside --out;
    without --merging, that section as it stands in --out (kept, not regenerated here)."""
    if not args.merging:
        return kept(args.out, MERGING_TITLE)
    import shutil

    with open(args.merging) as f:
        text = f.read().strip().split("\n", 1)[1]  # without its own title
    png = os.path.splitext(args.merging)[0] + ".png"
    lines = ["", MERGING_TITLE, "", text]
    if os.path.isfile(png):
        shutil.copy(png, os.path.join(os.path.dirname(os.path.abspath(args.out)), os.path.basename(png)))
        lines += ["", f"![last accuracy against inference GFLOPs]({os.path.basename(png)})"]
    return lines


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", help="only these methods (default: every method with a digits.yaml, "
                                                     "plus the baselines)")
    parser.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    parser.add_argument("--log_root", default=os.path.join(ROOT, "logs", "compare"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results.md"))
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs found under --log_root")
    parser.add_argument("--merging", help="the dynammo_merging.md that benchmarks.tables.dynammo_merging wrote, "
                                          "to include (with its PNG, copied beside --out); default: keep the "
                                          "section already in --out")
    parser.add_argument("--conditions", help="what else ran on the machine during the runs, said in the header "
                                             "(the runs cannot tell; it slows their wall times)")
    args = parser.parse_args(argv)
    done = [run_row(r, args.seeds, args.log_root, args.reuse) for r in rows(args.methods)]  # one run at a time
    trained_min = sum(r["summary"]["train_time_s"]["mean"] * len(args.seeds) for r in done if "summary" in r) / 60
    png = os.path.splitext(args.out)[0] + ".png"
    seeds = " ".join(args.seeds)
    environment = common([e for r in done if "summary" in r for e in r["environments"]])  # of the rows that ran
    lines = ["# Methods compared on digits", "",
             f"Generated by `python -m benchmarks.tables.compare_methods --seeds {seeds}` "
             f"({time.strftime('%Y-%m-%d')}, one run at a time; {environment}"
             + (f"; {args.conditions}" if args.conditions else "") + f"; training {trained_min:.0f} min "
             f"summed over rows and seeds). Mean ± sample std (n - 1) over {len(args.seeds)} seeds ({seeds}); "
             "accuracies in %; "
             "\"last acc\" is the method's classifier of record after the last task (NME for iCaRL, the network's "
             "head otherwise); GFLOPs = fvcore count (multiply-adds) per image at test time after the last task; "
             "params = those the test-time forward uses; train time = wall time of training summed over the tasks, "
             "per seed.", "",
             "## Methods on a ResNet-32 trained from scratch", "",
             "Budget, the same for every row: " + BUDGET_TEXT["cnn"].format(**CNN_BUDGET), "",
             *table([r for r in done if r["table"] == "cnn"]), "", "Targets of the comparison:", "",
             *(targets(done) or ["- (the baselines are not in this table)"]), "",
             "## Prompt methods on a frozen ViT", "",
             "Budget: " + BUDGET_TEXT["vit"].format(**VIT_BUDGET), "",
             *table([r for r in done if r["table"] == "vit"]), "",
             f"![last accuracy against inference GFLOPs]({os.path.basename(png)})", "",
             "Commands (one row each):", "", *[f"- {r['label']}: `{r['cmd']}`" for r in done], *merging(args),
             *kept(args.out, PRETRAINED_TITLE)]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(done, png, environment.removeprefix("every run: "))
    print("\n".join(lines))
    return done


if __name__ == "__main__":
    main()
