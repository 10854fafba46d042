"""Run every `options/*/digits.yaml` once (seed 1) and record what a refactoring must not change.

    python -m benchmarks.validation.parity run --out before.json [--root CHECKOUT] [--jobs 2] [--methods m ...]
                                               [--args "--amp false"]
    python -m benchmarks.validation.parity compare before.json after.json
    python -m benchmarks.validation.parity golden [--write] [--methods M ...]

`run` trains each config through `main.py` in a subprocess with one thread (so the numbers do not depend on
the machine's thread count) and writes, per config, the accuracy matrix, last and average incremental accuracy,
and the GFLOPs and parameters after each task, with the environment the run recorded (CPU model, precision,
fast paths; not compared), and prints it. `--root` runs another checkout (for example the commit before a
restructuring) with the same driver. `compare` prints the configs whose numbers differ, and exits 1 if any do; it
prints both files' environments, which must match for the numbers to (a run in bfloat16 autocast and one in
float32 differ whatever the code).

`golden` is the fast form the test suite runs on every commit (tests/test_golden.py): every registered method on
two tiny digits tasks, one epoch per stage, in float64 (so that neither the thread count nor the CPU's vector
width changes a prediction), compared with tests/golden.json; `--write` rewrites that file, for a change that is
meant to change the numbers (say so in its commit). It prints the environment the runs recorded.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from benchmarks.environment import common, of_runs
from benchmarks.run import ROOT, RunFailed, run_config

KEYS = ("acc_matrix", "last_acc", "avg_incremental_acc")
GOLDEN = os.path.join(ROOT, "tests", "golden.json")


def run_one(root: str, config: str, log_root: str, extra: list[str]) -> dict:
    """One config of checkout `root`, seed 1, in a subprocess on one thread (its log root of its own)."""
    name = os.path.relpath(config, root)
    argv = ["--config", name, "--seed", "1", "--device", "cpu", *extra]
    try:
        results, _ = run_config(argv, log_root=os.path.join(log_root, name.replace("/", "_")), root=root, threads=1)
    except RunFailed as err:
        return {"error": str(err)}
    run = results["runs"][0]
    return {**{k: run[k] for k in KEYS}, "gflops": [t["gflops"] for t in run["tasks"]],
            "params": [t["params"] for t in run["tasks"]], "train_time_s": sum(t["train_time_s"] for t in run["tasks"]),
            "environment": of_runs(results)}


def run(root: str, out: str, jobs: int, only: list[str] | None, extra: list[str]) -> None:
    configs = sorted(glob.glob(os.path.join(root, "options", "*", "digits.yaml")))
    if only:
        configs = [c for c in configs if os.path.basename(os.path.dirname(c)) in only]
    with tempfile.TemporaryDirectory() as logs, ThreadPoolExecutor(jobs) as pool:
        results = dict(zip((os.path.relpath(c, root) for c in configs),
                           pool.map(lambda c: run_one(root, c, logs, extra), configs)))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    for name, r in results.items():
        print(f"{name:40s} " + (r["error"] if "error" in r else f"last {r['last_acc']:.2f} ({r['train_time_s']:.0f} s)"))
    print(f"environment: {environment(results)}")


def environment(results: dict) -> str:
    """The environment the configs of a `run` file ran in, in a line (older files recorded none)."""
    return common([e for r in results.values() if "error" not in r for e in r.get("environment", [None])])


def compare(before: str, after: str) -> int:
    with open(before) as f:
        a = json.load(f)
    with open(after) as f:
        b = json.load(f)
    differ = 0
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        same = x is not None and y is not None and all(x.get(k) == y.get(k) for k in (*KEYS, "gflops", "params"))
        differ += not same
        status = "identical" if same else "DIFFERENT"
        detail = "" if same or x is None or y is None else f" last {x.get('last_acc')} -> {y.get('last_acc')}"
        print(f"{name:40s} {status}{detail}")
    print(f"{len(set(a) | set(b)) - differ} identical, {differ} different")
    print(f"before: {environment(a)}\nafter: {environment(b)}")
    return 1 if differ else 0


def golden_argv(method: str) -> list[str]:
    """The tiny float64 run of `method` the golden check makes: its digits config, two tasks of five classes, one
    epoch in every stage (`epochs`, `init_epochs` and the method's own `epochs*` keys), CNNs at the digits' native
    8 px and ViTs at 16 px, seed 1, on the CPU."""
    from methods import method_config

    config = os.path.join(ROOT, "options", method, "digits.yaml")
    with open(config) as f:
        size = "16" if "vit" in f.read() else "8"
    own = method_config(method)
    stage_epochs = [k for k in (own.__dataclass_fields__ if own else ()) if k.startswith("epochs")]
    return ["--config", config, "--device", "cpu", "--seed", "1", "--init_cls", "5", "--increment", "5",
            "--img_size", size, "--epochs", "1", "--init_epochs", "1", "--precision", "float64",
            *[a for k in stage_epochs for a in (f"--{k}", "1")]]


def golden_record(method: str, log_root: str, environments: list | None = None) -> dict:
    """What the golden check compares: the accuracy matrix and the inference GFLOPs and parameters per task; the
    environment the run recorded is appended to `environments` when given."""
    results, _ = run_config(golden_argv(method), log_root=log_root)
    run = results["runs"][0]
    if environments is not None:
        environments += of_runs(results)
    return {"acc_matrix": run["acc_matrix"], "gflops": [t["gflops"] for t in run["tasks"]],
            "params": [t["params"] for t in run["tasks"]]}


def golden(write: bool, methods: list[str] | None = None) -> int:
    """Measure every registered method (or `methods`); compare with tests/golden.json, or rewrite it (with
    `methods`: only their entries)."""
    from methods import METHODS

    environments = []
    with tempfile.TemporaryDirectory() as logs:
        measured = {m: golden_record(m, os.path.join(logs, m), environments) for m in methods or METHODS.keys()}
    print(f"environment: {common(environments)}")
    with open(GOLDEN) as f:
        stored = json.load(f)
    if write:
        with open(GOLDEN, "w") as f:
            json.dump({**stored, **measured} if methods else measured, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {GOLDEN}")
        return 0
    differ = [m for m in sorted(set(measured) | (set() if methods else set(stored)))
              if measured.get(m) != stored.get(m)]
    print("\n".join(f"{m}: {stored.get(m)} -> {measured.get(m)}" for m in differ) or "every method as stored")
    return 1 if differ else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--root", default=ROOT)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--methods", nargs="*")
    r.add_argument("--args", default="", help="more main.py arguments for every run, e.g. '--amp false'")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    g = sub.add_parser("golden")
    g.add_argument("--write", action="store_true", help="rewrite tests/golden.json with the measured numbers")
    g.add_argument("--methods", nargs="+", help="only these methods (with --write: only their entries change)")
    args = parser.parse_args()
    if args.command == "run":
        run(os.path.abspath(args.root), args.out, args.jobs, args.methods, args.args.split())
    elif args.command == "golden":
        sys.exit(golden(args.write, args.methods))
    else:
        sys.exit(compare(args.before, args.after))
