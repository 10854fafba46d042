"""iCaRL on the budget users compare frameworks with, seed by seed: per-task NME and CNN accuracy and wall time.

    python -m benchmarks.pycil.reference_icarl [--seeds 1993 1 2] [--epochs 10] [--threads 1] [--jobs 1]
        [--pycil DIR] [--pycil_torch_seed fixed|run] [--ours_init seed|pycil]

The budget (PyCIL's iCaRL loop on scikit-learn's digits): the stratified 80/20 split of datasets/digits.py,
images resized to 32 px, no augmentation, resnet32, 5 tasks x 2 classes in the order
np.random.RandomState(seed).permutation(10), 10 epochs per task, memory 200 (a fixed total, herding), SGD lr 0.1
momentum 0.9 weight decay 5e-4, constant rate, batch 32, KD temperature 2. With `--pycil DIR` the same budget also
runs in a PyCIL checkout: its main.py with the JSON config this script writes (memory, classes, seed, device) and
the schedule set on models/icarl.py's module constants (epochs, rates, milestones, batch, workers), which is where
PyCIL's iCaRL reads them from. PyCIL has no digits data set: the checkout needs a `digits` entry in utils/data.py
serving the same 32 px images; the version read here also needed two one-line fixes to run on CPU with a 2-class
first task (trainer.py compares the whole device list to -1; models/base.py asks for the top 5 of 2 classes).
Its per-task NME and CNN accuracy are read from its log. Prints one table per framework, the mean last NME with
its sample std over the seeds and what ran it (ours: the CPU model, precision and fast paths our runs recorded in
results.json; PyCIL: its own float32 loop, no autocast), and, with both, the mean paired difference over the
seeds with its standard error (sample std / sqrt(n)). `--jobs N` runs N of the (framework, seed) runs at once,
each in its own process on `--threads` threads (wall times then share the machine).

Seeds are not alike in the two: PyCIL's trainer seeds torch with 1 whatever the seed, so every PyCIL "seed" starts
from one and the same initial network; here a seed draws the class order, the initial network and the batch
orders. `--pycil_torch_seed run` seeds PyCIL's torch with the run's seed (a PyCIL that varies what ours
varies); `--ours_init pycil` starts our runs from PyCIL's initial backbone (what every PyCIL seed starts from),
through our `pretrain_path`.
benchmarks.pycil.reference_icarl_paired compares the two piece by piece on the same inputs (weights, batches),
benchmarks.pycil.reference_icarl_fork from one shared state onward; benchmarks/pycil/README.md tells how to get a
PyCIL checkout, and docs/icarl_vs_pycil.md holds the results. The pieces those two scripts share live here:
the budget (BUDGET, pycil_budget) and the running of a script in the PyCIL checkout (run_in_pycil).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from benchmarks.environment import common, of_runs
from benchmarks.run import run_config
from trainer.metrics import format_mean_std, mean_std

BUDGET = ["--config", "options/icarl/digits.yaml", "--backbone", "resnet32", "--img_size", "32", "--init_cls", "2",
          "--increment", "2", "--memory_size", "200", "--batch_size", "32", "--lrate", "0.1", "--init_lrate", "0.1",
          "--opt_mom", "0.9", "--weight_decay", "5e-4", "--init_weight_decay", "5e-4", "--scheduler", "none",
          "--device", "cpu", "--save_models", "false", "--shuffle", "true"]


def ours(seed: int, epochs: int, log_root: str, backbone: str | None = None) -> dict:
    """One seed of our iCaRL on the budget, in this process; `backbone`: a file of initial backbone weights (else
    drawn from seed)."""
    start = time.perf_counter()
    start_from = ["--pretrained", "true", "--pretrain_path", backbone] if backbone else []
    results, _ = run_config([*BUDGET, "--seed", str(seed), "--epochs", str(epochs), "--init_epochs", str(epochs),
                             *start_from], log_root=log_root)
    run = results["runs"][0]
    return {"nme": [t["nme_acc"] for t in run["tasks"]], "cnn": [t["cnn_acc"] for t in run["tasks"]],
            "seconds": time.perf_counter() - start, "environment": of_runs(results)}


# PyCIL's models/icarl.py takes its schedule from module constants (200/170 epochs, milestones, batch 128,
# 8 workers), not from the JSON config: the budget is set there, before its main.py runs; no file is changed.
# PyCIL's trainer seeds torch with 1 whatever the seed (trainer._set_random), so its seeds share one initial
# network; torch_seed "run" seeds torch with the run's seed instead (as this framework does), by replacing that
# function before its main.py runs. Every script here runs as `python -c` with cwd = the PyCIL checkout, which
# puts that directory first on sys.path: its trainer, models and utils are the ones imported.
PYCIL_RUN = """import runpy, sys
import torch
import models.icarl as icarl
for name, value in {budget!r}.items():
    setattr(icarl, name, value)
torch_seed = {torch_seed!r}
if torch_seed is not None:
    import trainer
    trainer._set_random = lambda: torch.manual_seed(torch_seed)
sys.argv = ["main.py", "--config", {config!r}]
runpy.run_path("main.py", run_name="__main__")
"""

# PyCIL's initial backbone as its trainer builds it for every seed (torch seeded with 1, then IncrementalNet),
# saved under our resnet32's tensor names (the two definitions hold the same tensors in the same order)
PYCIL_INIT = """import torch
from utils.inc_net import IncrementalNet
torch.manual_seed(1)
net = IncrementalNet({{"convnet_type": "resnet32", "dataset": "digits", "device": [torch.device("cpu")]}}, False)
torch.save({{k.removeprefix("convnet."): v for k, v in net.state_dict().items()
            if k.startswith("convnet.") and not k.startswith("convnet.fc.")}}, {path!r})
"""


def pycil_backbone(root: str, path: str) -> str:
    """Write PyCIL's initial resnet32 (every PyCIL seed starts from it) to `path` with our tensor names."""
    import torch

    from backbone import build_backbone

    theirs = os.path.join(os.path.dirname(path), "pycil_init.pt")
    proc = subprocess.run([sys.executable, "-c", PYCIL_INIT.format(path=theirs)], cwd=root, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"PyCIL's initial network could not be built: {proc.stderr.strip().splitlines()[-1:]}")
    state = torch.load(theirs, weights_only=True)
    names = list(build_backbone("resnet32", False, None).state_dict())
    if len(names) != len(state):
        raise SystemExit(f"PyCIL's resnet32 has {len(state)} tensors, ours {len(names)}")
    torch.save(dict(zip(names, state.values())), path)
    return path


# the head of a script run in the PyCIL checkout (reference_icarl_paired, reference_icarl_fork), its options as
# JSON in argv[1]: one thread, the budget on models/icarl.py's constants
PYCIL_PRELUDE = r"""
import copy, json, sys
import numpy as np, torch
opts = json.loads(sys.argv[1])
torch.set_num_threads(1)
import models.icarl as icarl
for name, value in opts["constants"].items():
    setattr(icarl, name, value)
from utils.data_manager import DataManager
"""


def run_in_pycil(root: str, script: str, seed: int, epochs: int, **opts) -> dict:
    """Run PYCIL_PRELUDE + `script` in the PyCIL checkout `root` on one thread, with `opts` plus the seed, the
    epochs, this budget in PyCIL's terms (`config`, `constants`) and `out`, the file the script torch.saves its
    results to; returns those results."""
    import torch

    config, constants = pycil_budget(seed, epochs)
    with tempfile.TemporaryDirectory() as tmp:
        opts = dict(opts, seed=seed, epochs=epochs, config=config, constants=constants,
                    out=os.path.join(tmp, "pycil.pt"))
        proc = subprocess.run([sys.executable, "-c", PYCIL_PRELUDE + script, json.dumps(opts)],
                              cwd=os.path.abspath(root), capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode != 0:
            raise SystemExit(f"PyCIL side failed: {proc.stderr.strip().splitlines()[-1:]}")
        return torch.load(opts["out"], weights_only=False)


def pycil_budget(seed: int, epochs: int) -> tuple[dict, dict]:
    """This budget in PyCIL's terms: its JSON config, and the values of models/icarl.py's module constants."""
    config = {"prefix": "reference", "dataset": "digits", "memory_size": 200, "memory_per_class": 20,
              "fixed_memory": False, "shuffle": True, "init_cls": 2, "increment": 2, "model_name": "icarl",
              "convnet_type": "resnet32", "device": ["cpu"], "seed": [seed]}
    constants = {"init_epoch": epochs, "epochs": epochs, "init_lr": 0.1, "lrate": 0.1, "init_milestones": [],
                 "milestones": [], "init_weight_decay": 5e-4, "weight_decay": 5e-4, "batch_size": 32, "T": 2,
                 "num_workers": 0}
    return config, constants


def pycil(root: str, seed: int, epochs: int, threads: int, folder: str, torch_seed: int | None = None) -> dict:
    """One seed of PyCIL's iCaRL on the same budget (torch seeded with `torch_seed`, else PyCIL's own 1)."""
    config, budget = pycil_budget(seed, epochs)
    path = os.path.join(folder, f"icarl_digits_{seed}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    script = PYCIL_RUN.format(budget=budget, config=path, torch_seed=torch_seed)
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    nme = re.findall(r"NME top1 curve: \[([^\]]*)\]", text)
    cnn = re.findall(r"CNN top1 curve: \[([^\]]*)\]", text)
    if proc.returncode != 0 or not nme:
        raise SystemExit(f"PyCIL run failed (seed {seed}): {text.strip().splitlines()[-1:]}")
    import torch

    from trainer.device import machine

    # this interpreter's torch on this CPU, `threads` threads; PyCIL's iCaRL loop has no autocast and no
    # channels-last: float32 as written
    environment = {**machine(torch.device("cpu")), "threads": threads, "precision": "float32", "autocast": None,
                   "gradient_scaling": False, "channels_last": False, "processes": 1, "sync_bn": False}

    def curve(found: str) -> list[float]:  # numpy 2 prints np.float64(97.2)
        return [float(v) for v in re.sub(r"np\.float64\(([^)]*)\)", r"\1", found).split(",")]

    return {"nme": curve(nme[-1]), "cnn": curve(cnn[-1]), "seconds": seconds, "environment": [environment]}


def table(name: str, results: dict) -> str:
    lines = [f"{name}", "| seed | NME per task | CNN per task | last NME | wall time (s) |", "|---|---|---|---|---|"]
    for seed, r in results.items():
        lines.append(f"| {seed} | {', '.join(f'{v:.1f}' for v in r['nme'])} | {', '.join(f'{v:.1f}' for v in r['cnn'])}"
                     f" | {r['nme'][-1]:.2f} | {r['seconds']:.0f} |")
    last = mean_std([r["nme"][-1] for r in results.values()])
    spread = " (mean ± sample std over {n} seeds)".format(n=last["n"]) if last["std"] is not None else ""
    return "\n".join(lines + [f"mean last NME accuracy: {format_mean_std(last)}{spread}",
                              f"ran on: {common([e for r in results.values() for e in r['environment']])}"])


def paired_difference(results: dict) -> str:
    """Ours minus PyCIL in last NME over the seeds both ran (a seed gives both the same class order), with the
    standard error of that mean difference."""
    seeds = [s for s in results["ours"] if s in results["pycil"]]
    diff = mean_std([results["ours"][s]["nme"][-1] - results["pycil"][s]["nme"][-1] for s in seeds])
    se = f", standard error {diff['std'] / diff['n'] ** 0.5:.2f}" if diff["std"] is not None else ""  # sample std
    return f"last NME, ours - PyCIL: {diff['mean']:+.2f} over {diff['n']} seeds{se}"


def one_run(job: tuple) -> tuple:
    """One (framework, seed) of the comparison, in this process or a worker of `--jobs`."""
    import torch

    framework, seed, args, folder, backbone = job
    torch.set_num_threads(args.threads)
    if framework == "ours":
        return framework, seed, ours(seed, args.epochs, os.path.join(folder, str(seed)), backbone)
    torch_seed = seed if args.pycil_torch_seed == "run" else None
    return framework, seed, pycil(os.path.abspath(args.pycil), seed, args.epochs, args.threads, folder, torch_seed)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--pycil", help="an unmodified PyCIL checkout with a digits entry, to run side by side")
    parser.add_argument("--skip_ours", action="store_true", help="with --pycil: run PyCIL only")
    parser.add_argument("--pycil_torch_seed", choices=("fixed", "run"), default="fixed",
                        help="fixed: PyCIL as shipped (torch seeded with 1 for every seed); run: with the run's seed")
    parser.add_argument("--ours_init", choices=("seed", "pycil"), default="seed",
                        help="pycil: our runs start from PyCIL's initial backbone (needs --pycil)")
    args = parser.parse_args(argv)
    if args.ours_init == "pycil" and not args.pycil:
        parser.error("--ours_init pycil needs --pycil DIR")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    frameworks = (["ours"] if not args.skip_ours else []) + (["pycil"] if args.pycil else [])
    results = {"ours": {}, "pycil": {}}
    with tempfile.TemporaryDirectory() as tmp:
        backbone = None
        if args.ours_init == "pycil" and not args.skip_ours:
            backbone = pycil_backbone(os.path.abspath(args.pycil), os.path.join(tmp, "pycil_backbone.pt"))
        jobs = [(f, seed, args, tmp, backbone) for seed in args.seeds for f in frameworks]
        # spawned workers: each run has its own torch and its own threads
        with (ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) if args.jobs > 1
              else contextlib.nullcontext()) as pool:
            for framework, seed, result in (pool.map if pool else map)(one_run, jobs):
                results[framework][seed] = result
    if results["ours"]:
        print(table("this framework", results["ours"]))
    if args.pycil:
        print(table("PyCIL", results["pycil"]))
    if results["ours"] and results["pycil"]:
        print(paired_difference(results))
    return results


if __name__ == "__main__":
    main()
