"""Inference cost of the dynamic-architecture methods as tasks accumulate: ACL, DynaMMo and DER (w/o pruning).

For resnet18 at 224 px (random weights: only the structure matters) and T = 1..max_tasks, each method is built
through the registry exactly as a run builds it, enters every task with `begin_task` (and DynaMMo merges its
adapters, as after a task), and `method.predict`, the forward that evaluation runs, is measured:
fvcore GMACs and the parameters it touches (trainer/flops.inference_cost, per image), and CPU inference images/s
on a small batch at a few values of T. The forward is timed outside the engine, as built: no autocast, the
weights' dtype and memory format as the registry leaves them; the script prints that with the CPU model
(trainer.device.machine) and puts it on the plot. Writes dynamic_cost.csv and dynamic_cost.png to the output
folder. Nothing is asserted about time.

    python -m benchmarks.tables.dynamic_cost [out_dir] [--max_tasks 10] [--time_tasks 1 5 10] [--batch 4]
                                             [--threads N]

Expected from shapes (GMACs): ACL ~ 0.12 + 2.50 T, DynaMMo ~ 2.62 flat, DER ~ 1.82 T.
"""
from __future__ import annotations

import argparse
import csv
import os
import textwrap
import time

import torch

from benchmarks.environment import common
from benchmarks.run import ROOT

METHODS = ("acl", "dynammo", "dynamic_er")
IMG_SIZE = 224


def build(name: str, n_tasks: int):
    """The registered method on resnet18 at 224 px, with `n_tasks` one-class tasks (digits as a stand-in data
    set: only the number of tasks matters for the cost)."""
    from datasets.scenario import DataManager
    from methods import build_method, method_config
    from trainer.config_loader import load_config

    cli = {"method": name, "dataset": "digits", "backbone": "resnet18", "img_size": IMG_SIZE, "init_cls": 1,
           "increment": 1, "memory_size": 10, "device": "cpu"}
    cfg = load_config(None, cli, method_config)
    data = DataManager(cfg, seed=0)
    if n_tasks > len(data.tasks):
        raise SystemExit(f"at most {len(data.tasks)} tasks")
    return build_method(cfg, data)


def next_task(method) -> None:
    method.begin_task(method.data.tasks[0 if method.task is None else method.task.index + 1])
    if getattr(method.network, "merged", None) is not None:  # DynaMMo: merge once after the task
        method.network.merge()


@torch.no_grad()
def images_per_s(method, batch: int, repeats: int = 2) -> float:
    x = torch.randn(batch, 3, IMG_SIZE, IMG_SIZE)
    method.eval()
    method.predict(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        method.predict(x)
        best = min(best, time.perf_counter() - start)
    return batch / best


def timed_forward(method) -> dict:
    """What `images_per_s` times, in the keys of results.json's environment: the CPU (trainer.device.machine) and
    the precision and layout of the forward, read off the built method (it runs outside the engine: no autocast)."""
    from trainer.device import machine

    weights = [m.weight for m in method.modules() if isinstance(m, torch.nn.Conv2d)]
    return {**machine(torch.device("cpu")), "precision": str(weights[0].dtype).removeprefix("torch."),
            "autocast": None, "gradient_scaling": False, "processes": 1, "sync_bn": False,
            "channels_last": any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                                 for w in weights)}


def measure(max_tasks: int, time_tasks: set[int], batch: int) -> tuple[list[dict], str]:
    """The rows, and what the timed forwards ran on (benchmarks.environment.common of every method's)."""
    from trainer.flops import inference_cost

    rows, environments = [], []
    for name in METHODS:
        method = build(name, max_tasks)
        environments.append(timed_forward(method))
        for t in range(1, max_tasks + 1):
            next_task(method)
            gmacs, params = inference_cost(method, IMG_SIZE, torch.device("cpu"))
            speed = images_per_s(method, batch) if t in time_tasks else None
            rows.append({"method": name, "tasks": t, "gmacs": round(gmacs, 4), "params_m": round(params / 1e6, 3),
                         "images_per_s": None if speed is None else round(speed, 2)})
            print(f"{name:<11} T={t:<2} {gmacs:7.3f} GMACs {params / 1e6:8.2f} M params"
                  + ("" if speed is None else f" {speed:7.2f} images/s (batch {batch})"), flush=True)
        del method
    return rows, common(environments).removeprefix("every run: ")


def plot(rows: list[dict], path: str, environment: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cost, ax_speed) = plt.subplots(1, 2, figsize=(10, 4))
    for name in METHODS:
        mine = [r for r in rows if r["method"] == name]
        ax_cost.plot([r["tasks"] for r in mine], [r["gmacs"] for r in mine], marker="o", label=name)
        timed = [r for r in mine if r["images_per_s"] is not None]
        ax_speed.plot([r["tasks"] for r in timed], [r["images_per_s"] for r in timed], marker="o", label=name)
    ax_cost.set(xlabel="tasks T", ylabel="GMACs per image (fvcore)", title=f"resnet18, {IMG_SIZE} px")
    ax_speed.set(xlabel="tasks T", ylabel="images / s (CPU)")
    ax_speed.set_title("CPU inference\n" + "\n".join(textwrap.wrap(environment, 70)), fontsize=7)
    for ax in (ax_cost, ax_speed):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=os.path.join(ROOT, "benchmarks", "out"))
    parser.add_argument("--max_tasks", type=int, default=10)
    parser.add_argument("--time_tasks", type=int, nargs="*", default=[1, 5, 10], help="T values timed on the CPU")
    parser.add_argument("--batch", type=int, default=4, help="images per timed forward")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, environment = measure(args.max_tasks, set(args.time_tasks), args.batch)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "dynamic_cost.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.out_dir, "dynamic_cost.png"), environment)
    print(f"timed forwards: {environment}")
    print(f"wrote {args.out_dir}/dynamic_cost.csv and dynamic_cost.png")
    return rows


if __name__ == "__main__":
    main()
