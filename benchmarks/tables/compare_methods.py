"""Compare every method on digits at one common budget; write docs/results.md and docs/results.png (both are
generated, never typed by hand).

The table is the sweep benchmarks/tables/compare_methods.yaml (every row a point, the budget its `fixed`, seeds 1 2
3), run by trainer.sweep. The rows whose settings were once picked by looking at test accuracies (BiC, GEM, PODNet,
EWC) are first tuned by the sweep benchmarks/tables/tuning.yaml: a small declared grid each, on seeds 101 and 102
(never a reported seed), with 20% of each class's training samples held out (val_split 0.2); the point of highest
mean final validation accuracy replaces the row's points, and the table's sweep, so filled in, is written out as
<table log_root>/table.yaml. Reported rows train on the whole training set (no validation split).

Both sweeps run through the local launcher, `--jobs` runs at once with the cores split between them, and skip what
has finished: running this again after a crash or an interruption finishes the sweeps without training a finished
run twice, and with everything finished it only rewrites the document. Per row, from its results.json: mean ±
sample std (n - 1) over the seeds of last accuracy, average incremental accuracy and forgetting, the inference
GFLOPs and parameters after the last task, and the training wall time per seed. The header says what ran the
runs, from their results.json: the CPU model, the precision (bfloat16 autocast on a CPU with native bfloat16,
float32 elsewhere) and the fast paths, listing each distinct environment if the runs do not share one; what else
the machine ran meanwhile (which the runs cannot know, and which slows the wall times) is `--conditions`.
The prompt methods run on a ViT, as their papers do, in a table of their own.

    python -m benchmarks.tables.compare_methods [--jobs 2] [--out docs/results.md] [--conditions TEXT]
                                                [--merging FILE]

Run it from the repository root (the sweep files' paths are relative to it). Without `--merging`, the DynaMMo
section already in `--out` (benchmarks.tables.dynammo_merging's) is kept, and so is always the pretrained-backbone
section (benchmarks.tables.pretrained_cil's).
"""
from __future__ import annotations

import argparse
import os
import textwrap
import time

import yaml

from benchmarks.environment import common, of_runs
from benchmarks.run import ROOT
from benchmarks.tables.pretrained_cil import TITLE as PRETRAINED_TITLE
from trainer import sweep as sweeps
from trainer.metrics import format_mean_std
from trainer.results import read_results

TABLE = os.path.join("benchmarks", "tables", "compare_methods.yaml")
TUNING = os.path.join("benchmarks", "tables", "tuning.yaml")
BUDGET_TEXT = {
    "cnn": ("scikit-learn digits, 5 tasks of 2 classes, the class order shuffled by each seed (the same order for "
            "every method), images at {img_size} px, {epochs} epochs per task (every stage of a method's main "
            "training; a method's extra stages, such as a class-balanced or bias-correction stage, are its own and "
            "counted in its wall time), batch {batch_size}, a replay memory of {memory_size} samples in all "
            "(split over the seen classes, each method's own selection; none for the rehearsal-free rows; GEM keeps "
            "20 per class, its paper's fixed per-task episodic memory, so at most 200), networks trained from "
            "scratch, SGD for every method (with momentum 0.9, weight decay 5e-4 and a cosine schedule, except GEM, "
            "whose projection needs plain SGD)."),
    "vit": ("scikit-learn digits, 5 tasks of 2 classes, the same class orders, a frozen vit_tiny_patch16_224 with "
            "random weights at {img_size} px (one patch per image), {epochs} epochs per task, batch {batch_size}, "
            "no replay memory, Adam. The numbers say little about the methods, which need pretrained features; "
            "they show the methods run and how their costs compare."),
}
# The rows that are not a method's own settings, by (method, point): the baselines.
BASELINES = {("finetune_il", "apply_nme=false_memory_size=0"): "finetune_il, no memory (lower bound)",
             ("finetune_il", "default"): "finetune_il + replay",
             ("finetune_normal", "default"): "finetune_normal (joint training, upper bound)"}
LOWER, REPLAY, JOINT = BASELINES.values()
SHORT = {LOWER: "finetune, no memory", REPLAY: "finetune + replay", JOINT: "joint"}


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


def tune(jobs: int) -> tuple[sweeps.Sweep, list[dict], dict]:
    """Run the tuning sweep (what is not finished) and return it, its summary rows and the best point per config.
    A point that cannot finish (its weights or loss became non-finite: the grid reaches rates that diverge) is
    not chosen, and the table says why; a config without any finished point stops the table."""
    tuning = sweeps.load_sweep(TUNING)
    sweeps.run_sweep(tuning, "local", jobs)
    rows, best = sweeps.summarize_sweep(tuning)
    unchosen = [c for c, b in best.items() if not isinstance(b, dict)]
    if unchosen:
        raise SystemExit(f"the tuning sweep {TUNING} chose nothing for {', '.join(unchosen)}; run again to resume it")
    return tuning, rows, best


def _unfinished(tuning: sweeps.Sweep, row: dict) -> str:
    """Why a tuning point did not finish: the last line of its job's output."""
    (point,) = [p for p in tuning.points if p.config == row["config"] and p.note == row["point"]]
    path = os.path.join(tuning.log_root, "jobs", point.group, f"{point.note}.log")
    lines = []
    if os.path.isfile(path):
        with open(path) as f:
            lines = f.read().strip().splitlines()
    return lines[-1].split(";")[0] if lines else "not run"


def table_sweep(best: dict, log_root: str | None = None) -> sweeps.Sweep:
    """The table's sweep with each tuned config's points replaced by its chosen point, written out as
    <log_root>/table.yaml (the sweep that makes the table; log_root: the table file's unless given) and loaded."""
    with open(TABLE) as f:
        data = yaml.safe_load(f)
    configs = []
    for entry in data["configs"]:
        entry = {"config": entry} if isinstance(entry, str) else dict(entry)
        chosen = best.get(os.path.abspath(entry["config"]))
        if chosen is not None:
            entry["points"] = [chosen["overrides"]]
        configs.append(entry)
    log_root = os.path.abspath(log_root or data["log_root"])
    path = os.path.join(log_root, "table.yaml")
    os.makedirs(log_root, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {TABLE} with the points {TUNING} chose by validation accuracy (written by "
                "benchmarks.tables.compare_methods)\n")
        yaml.safe_dump({**data, "configs": configs, "log_root": log_root}, f, sort_keys=False)
    return sweeps.load_sweep(path)


def row(point: sweeps.Point, tuned: dict | None) -> dict:
    """A row of the table from the point's finished run folder; `tuned`: its tuning sweep's chosen row."""
    cfg = point.cfg
    label = BASELINES.get((cfg.method, point.note), cfg.method)
    argv = point.new_run_argv()[:-4]  # without --note and --log_root; the config relative to the repository
    argv[1] = os.path.relpath(argv[1], ROOT)
    out = {"label": label, "method": cfg.method, "table": "vit" if "vit" in cfg.backbone else "cnn",
           "memory_size": cfg.memory_size, "cmd": " ".join(["python", "main.py", *argv]), "tuned": tuned}
    folder = point.folder()
    results = read_results(folder) if folder else None
    if not results or not results.get("summary"):
        return {**out, "error": f"no finished run in {folder}"}
    return {**out, "summary": results["summary"], "optimiser": _optimiser(cfg), "environments": of_runs(results)}


def _point_text(overrides: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in overrides.items()) or "the yaml's values"


def table(done: list[dict]) -> list[str]:
    lines = ["| method | last acc | avg incremental acc | forgetting | last NME acc | GFLOPs | params (M) | "
             "train time (s) | optimiser | chosen on validation |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in done:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | | | | |")
            continue
        s = r["summary"]
        stats = " | ".join(format_mean_std(s.get(k)) for k in ("last_acc", "avg_incremental_acc", "forgetting",
                                                                "last_nme_acc"))
        lines.append(f"| {r['label']} | {stats} | {s['final_gflops']['mean']:.4f} | "
                     f"{s['final_params']['mean'] / 1e6:.3f} | {s['train_time_s']['mean']:.0f} | {r['optimiser']} | "
                     + (_point_text(r["tuned"]["overrides"]) if r["tuned"] else "-") + " |")
    return lines


def targets(done: list[dict]) -> list[str]:
    """The acceptance checks of the comparison (issue 11), evaluated on this table."""
    last = {r["label"]: r["summary"]["last_acc"] for r in done if "summary" in r}
    lower, replay = last.get(LOWER), last.get(REPLAY)
    if lower is None or replay is None:
        return []
    memory = [r["label"] for r in done if r["table"] == "cnn" and r["memory_size"] > 0 and r["label"] in last]
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


def tuning_section(tuning: sweeps.Sweep, rows: list[dict], best: dict) -> list[str]:
    """How the tuned values were chosen: every point of the tuning sweep with its validation accuracy."""
    with open(TUNING) as f:
        fixed = yaml.safe_load(f)["fixed"]
    lines = ["## How the tuned values were chosen", "",
             "The settings of BiC, GEM, PODNet and EWC on digits had been picked by looking at test accuracies (of "
             "the reported seeds 1 2 3 for BiC, GEM and PODNet, of seed 1993 for EWC). They are chosen again here, "
             f"by `python -m trainer.sweep {TUNING}`: a small grid each, declared in that file before any of its "
             "runs and holding the values we had used, on the tuning seeds 101 and 102 (never a reported seed), at "
             f"the table's budget with {fixed['val_split']:.0%} of each class's training samples held out "
             "(`val_split`, stratified and seeded); the point of highest mean final validation accuracy (on the "
             "held-out samples of every class, after the last task) is the one the table runs, on seeds 1 2 3, "
             "trained on the whole training set; a point whose run could not finish (its loss or weights became "
             "non-finite) is not chosen, and a tie goes to the point listed first. Test accuracy chooses nothing: "
             "the tuning runs' test numbers are in their results.json but not used. Every other row runs its yaml's "
             "values, for which neither the yamls nor the commits record a choice made by looking at test "
             "accuracies, with one kind of exception: two deviations of the original's code were measured on "
             "seeds 1 2 3 (PODNet's proxy similarity, ACL's stage-2 heads; their yamls give the numbers) and the "
             "paper's or the original's setting kept whatever the result. EWC's CE over the new classes only "
             "(`ce_classes: new`) was chosen on one run's test accuracy (seed 1993) and is not re-tuned here. The "
             "prompt methods are not tuned.", "",
             "| method | point | final val acc (seeds 101 102) | chosen |", "|---|---|---|---|"]
    for r in rows:
        chosen = best.get(r["config"])
        method = os.path.basename(os.path.dirname(r["config"]))
        mark = "**chosen**" if isinstance(chosen, dict) and chosen["point"] == r["point"] else ""
        val = (format_mean_std(r["val_acc"]) if r["state"] == "finished"
               else f"did not finish: {_unfinished(tuning, r)}")
        lines.append(f"| {method} | {_point_text(r['overrides'])} | {val} | {mark} |")
    return lines


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, the cores split between them")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results.md"))
    parser.add_argument("--merging", help="the dynammo_merging.md that benchmarks.tables.dynammo_merging wrote, "
                                          "to include (with its PNG, copied beside --out); default: keep the "
                                          "section already in --out")
    parser.add_argument("--conditions", help="what else ran on the machine during the runs, said in the header "
                                             "(the runs cannot tell; it slows their wall times)")
    args = parser.parse_args(argv)
    tuning, tuning_rows, best = tune(args.jobs)
    table_runs = table_sweep(best)
    failed = sweeps.run_sweep(table_runs, "local", args.jobs)
    done = [row(p, best.get(p.config)) for p in table_runs.points]
    seeds = table_runs.points[0].cfg.seed
    trained_min = sum(r["summary"]["train_time_s"]["mean"] * len(seeds) for r in done if "summary" in r) / 60
    png = os.path.splitext(args.out)[0] + ".png"
    seed_text = " ".join(map(str, seeds))
    budget = table_runs.points[0].fixed
    environment = common([e for r in done if "summary" in r for e in r["environments"]])  # of the rows that ran
    lines = ["# Methods compared on digits", "",
             f"Generated by `python -m benchmarks.tables.compare_methods --jobs {args.jobs}` "
             f"({time.strftime('%Y-%m-%d')}; the sweep {TABLE}, its tuned rows chosen by the sweep {TUNING}; "
             f"{args.jobs} runs at a time, the cores split between them; {environment}"
             + (f"; {args.conditions}" if args.conditions else "") + f"; training {trained_min:.0f} min "
             f"summed over rows and seeds). Mean ± sample std (n - 1) over {len(seeds)} seeds ({seed_text}); "
             "accuracies in %; "
             "\"last acc\" is the method's classifier of record after the last task (NME for iCaRL, the network's "
             "head otherwise); GFLOPs = fvcore count (multiply-adds) per image at test time after the last task; "
             "params = those the test-time forward uses; train time = wall time of training summed over the tasks, "
             "per seed; \"chosen on validation\": the values the tuning sweep chose (below).", "",
             "## Methods on a ResNet-32 trained from scratch", "",
             "Budget, the same for every row: " + BUDGET_TEXT["cnn"].format(**budget), "",
             *table([r for r in done if r["table"] == "cnn"]), "", "Targets of the comparison:", "",
             *(targets(done) or ["- (the baselines are not in this table)"]), "",
             "## Prompt methods on a frozen ViT", "",
             "Budget: " + BUDGET_TEXT["vit"].format(**budget), "",
             *table([r for r in done if r["table"] == "vit"]), "",
             f"![last accuracy against inference GFLOPs]({os.path.basename(png)})", "",
             *tuning_section(tuning, tuning_rows, best), "",
             "Commands (one row each; the table's sweep runs them):", "",
             *[f"- {r['label']}: `{r['cmd']}`" for r in done], *merging(args), *kept(args.out, PRETRAINED_TITLE)]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(done, png, environment.removeprefix("every run: "))
    print("\n".join(lines))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}; run again to resume them")
    return done


if __name__ == "__main__":
    main()
