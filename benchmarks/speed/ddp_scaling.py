"""Training throughput of data-parallel runs: images per second of `main.py` with 1 process and with N processes
(torchrun, gloo on CPU; each process on one thread), the same global batch and the same run otherwise.

Throughput = training images seen (the task's samples x epochs, summed over tasks) / the training time the
run records per task (results.json `train_time_s`, which excludes evaluation, exemplar selection and start-up).
Runs one after the other, so they do not compete for cores; reports the ratio to the 1-process run, and what
the runs ran on (CPU or GPU model, precision, fast paths: the environment they recorded in results.json).

    python -m benchmarks.speed.ddp_scaling [--procs 1 2] [--method finetune_il] [--img_size 16] [--epochs 2]
                                           [--device cpu]   (--device 0 adds nothing but the GPU path of one process)
"""
from __future__ import annotations

import argparse
import os
import tempfile

from benchmarks.environment import common, of_runs
from benchmarks.run import ROOT, run_config


def run(procs: int, args, root: str) -> dict:
    """One run of `procs` processes (each in a subprocess of `args.threads` threads) and its training time."""
    argv = ["--config", os.path.join("options", args.method, "digits.yaml"), "--device", args.device, "--seed", "1",
            "--epochs", str(args.epochs), "--init_epochs", str(args.epochs), "--img_size", str(args.img_size),
            "--batch_size", str(args.batch_size), "--sync_bn", "true", "--save_models", "false", "--note",
            f"p{procs}"]
    results, _ = run_config(argv, log_root=root, threads=args.threads, procs=procs)
    tasks = results["runs"][0]["tasks"]
    seconds = sum(t["train_time_s"] for t in tasks)
    return {"procs": procs, "seconds": seconds, "last_acc": results["runs"][0]["last_acc"], "tasks": len(tasks),
            "environment": of_runs(results)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="finetune_il")
    parser.add_argument("--img_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64, help="the global batch")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from datasets.scenario import DataManager
    from methods import method_config
    from trainer.cli import parse_overrides
    from trainer.config_loader import load_config

    cfg = load_config(os.path.join(ROOT, "options", args.method, "digits.yaml"), parse_overrides(["--device", "cpu"]),
                      method_config)
    data = DataManager(cfg, seed=1)
    images = sum(len(data.indices("train", t.classes)) for t in data.tasks) * args.epochs  # new data; replay adds
    with tempfile.TemporaryDirectory() as root:
        rows = [run(p, args, root) for p in args.procs]
    base = rows[0]["seconds"]
    print(f"{args.method} on digits, {args.img_size} px, {args.epochs} epochs per task, global batch "
          f"{args.batch_size}, {args.threads} thread(s) per process, device {args.device}")
    # the rows differ in their number of processes (and so in synchronised BN, on only with several)
    print(common([e for r in rows for e in r["environment"]], ignore=("threads", "processes", "sync_bn")))
    print("| processes | train s | images/s (new data) | ratio to 1 | last acc |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['procs']} | {r['seconds']:.1f} | {images / r['seconds']:.0f} | {base / r['seconds']:.2f} | "
              f"{r['last_acc']:.2f} |")


if __name__ == "__main__":
    main()
