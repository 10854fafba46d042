"""End-to-end speed of the iCaRL reference budget, with every fast path on and off, side by side.

    python -m benchmarks.speed.speed [--seeds 1993] [--epochs 10] [--threads 1] [--rounds 1] [--before CHECKOUT]

The budget (issue 17's, the one users compare frameworks on): digits at 32 px, resnet32, 5 tasks x 2 classes,
10 epochs per task, memory 200 (herding), SGD lr 0.1 momentum 0.9 weight decay 5e-4, batch 32, constant rate.
"on" is the default configuration (channels-last, bfloat16 autocast where native, batched in-memory data);
"off" sets `--channels_last false --amp false --batch_transforms false` (per-sample PIL transforms). Each round
runs both in this process, alternating which goes first; `--before DIR` also times the same command in another
checkout (e.g. the commit before the speed work) in a subprocess, for the ratio against it. Prints the CPU model,
then, per mode, the wall time, the training images/s (the same workload in every mode) and the last NME accuracy,
the ratios, and what each mode ran in (precision, autocast, channels-last: the environment its runs recorded in
results.json, i.e. trainer.device.machine and Engine.fast_paths of the engine that trained them); writes the
table to benchmarks/out/speed.md.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.environment import MISSING, hardware, of_runs, precision
from benchmarks.run import ROOT, run_config

BUDGET = ["--config", "options/icarl/digits.yaml", "--backbone", "resnet32", "--img_size", "32", "--init_cls", "2",
          "--increment", "2", "--memory_size", "200", "--batch_size", "32", "--lrate", "0.1", "--init_lrate", "0.1",
          "--opt_mom", "0.9", "--weight_decay", "5e-4", "--init_weight_decay", "5e-4", "--scheduler", "none",
          "--device", "cpu", "--save_models", "false"]
MODES = {"on": [], "off": ["--channels_last", "false", "--amp", "false", "--batch_transforms", "false"]}


def training_images(seed: int, epochs: int) -> int:
    """Samples one run trains on: per task, epochs x (new-class samples + the exemplars kept of the old classes)."""
    from datasets.scenario import DataManager
    from methods import method_config
    from trainer.cli import parse_overrides
    from trainer.config_loader import load_config

    cfg = load_config(os.path.join(ROOT, BUDGET[1]), parse_overrides([*BUDGET[2:], "--seed", str(seed)]),
                      method_config)
    data = DataManager(cfg, seed)
    total = 0
    for task in data.tasks:
        quota = cfg.memory_size // task.known if task.known else 0
        memory = sum(min(len(data.indices("train", [c])), quota) for c in range(task.known))
        total += epochs * (len(data.indices("train", task.classes)) + memory)
    return total


def timed(argv: list[str], log_root: str, before: str | None, threads: int) -> tuple[float, dict]:
    """Wall time and the results of one run: here, in this process, or (`before`) in that checkout, in a
    subprocess on `threads` threads."""
    start = time.perf_counter()
    results, _ = run_config(argv, log_root=log_root, root=before, threads=None if before is None else threads)
    return time.perf_counter() - start, results


def mode_environment(envs: list[dict | None]) -> str:
    """The precision and fast paths of one mode's runs (and torch's version), or each distinct one."""
    known = {(precision(e), e.get("torch")) if e is not None else (MISSING, None) for e in envs}
    return "; ".join(text + (f", torch {torch}" if torch else "") for text, torch in sorted(known, key=str))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--before", help="another checkout to time with the same command (subprocess)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "speed.md"))
    args = parser.parse_args(argv)
    import torch

    from trainer.metrics import mean_std

    torch.set_num_threads(args.threads)
    modes = {**MODES, **({"before": None} if args.before else {})}
    times = {m: [] for m in modes}
    train_times = {m: [] for m in modes}
    accuracy = {m: [] for m in modes}
    environments = {m: [] for m in modes}
    images = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for seed in args.seeds:
                images += training_images(seed, args.epochs)
                order = list(modes) if r % 2 == 0 else list(reversed(modes))
                for mode in order:
                    run_argv = [*BUDGET, "--seed", str(seed), "--epochs", str(args.epochs), "--init_epochs",
                                str(args.epochs), *MODES.get(mode, [])]
                    seconds, results = timed(run_argv, os.path.join(tmp, f"{mode}{r}_{seed}"),
                                             args.before if mode == "before" else None, args.threads)
                    run = results["runs"][0]
                    environments[mode] += of_runs(results)
                    times[mode].append(seconds)
                    train_times[mode].append(sum(t["train_time_s"] for t in run["tasks"]))
                    accuracy[mode].append(run.get("last_nme_acc", run["last_acc"]))
    rows = []
    for mode in modes:
        rows.append(f"| {mode} | {sum(times[mode]):.1f} | {images / sum(train_times[mode]):.1f} | "
                    f"{mean_std(accuracy[mode])['mean']:.2f} |")
    ratios = {f"wall {m} / on": sum(times[m]) / sum(times["on"]) for m in modes if m != "on"}
    ratios.update({f"images/s on / {m}": sum(train_times[m]) / sum(train_times["on"]) for m in modes if m != "on"})
    machine = "; ".join(sorted({hardware(e) for envs in environments.values() for e in envs if e is not None}))
    text = "\n".join([f"iCaRL budget, seeds {args.seeds}, {args.epochs} epochs per task, {args.threads} thread(s), "
                      f"{args.rounds} round(s), {machine or MISSING}", "",
                      "| mode | wall time (s) | training images/s | last NME acc |",
                      "|---|---|---|---|", *rows, "", *(f"- {k}: {v:.2f}x" for k, v in ratios.items()), "",
                      "What each mode ran in (recorded by its runs):",
                      *(f"- {m}: {mode_environment(envs)}" for m, envs in environments.items())])
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return ratios


if __name__ == "__main__":
    main()
