"""Our iCaRL and PyCIL's trained onward from one and the same state: where in a run does a gap between them open?

    python -m benchmarks.pycil.reference_icarl_fork --pycil DIR [--seed 1] [--fork 4] [--repeats 4]

PyCIL (its own learner and loops in its checkout, torch seeded with 1 as its trainer does, the budget of
benchmarks.pycil.reference_icarl) trains tasks 0..fork-1 of the seed and saves its state: network, exemplar
memory, per-task NME. Then task `fork` is trained `--repeats` times from that state by each framework, each
repeat with its own draw of batch order and new head rows (PyCIL: torch seeded 1000 + r; ours: run seed
1000 + r), and the NME after it is printed per repeat. Ours starts from PyCIL's state loaded into our iCaRL (the
network by tensor order, the exemplars as train-pool positions, matched by image); its NME at the fork, from our
class means of PyCIL's network and exemplars, is printed beside PyCIL's. Equal distributions after the fork place
any gap before it. Ours trains and infers through its engine: the script prints its CPU model, precision and fast
paths (bfloat16 autocast on a CPU with native bfloat16; PyCIL's loops are float32, no autocast), and the mean ±
sample std of each framework's trainings.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from benchmarks.environment import describe
from benchmarks.pycil import reference_icarl
from benchmarks.run import ROOT
from trainer.metrics import format_mean_std, mean_std

# run in the PyCIL checkout after reference_icarl.PYCIL_PRELUDE
PYCIL_SIDE = r"""
def nme_of(learner):
    cnn, nme = learner.eval_task()
    return float(nme["top1"])

torch.manual_seed(1)  # PyCIL's trainer._set_random, whatever the seed
dm = DataManager("digits", True, opts["seed"], 2, 2)
learner = icarl.iCaRL(dict(opts["config"], device=[torch.device("cpu")]))
curve = []
for _ in range(opts["fork"]):
    learner.incremental_train(dm)
    curve.append(nme_of(learner))
    learner.after_task()
train = np.load("data/digits32.npz")["train_data"]
rows = [int(np.flatnonzero((train == m).all(axis=(1, 2, 3)))[0]) for m in learner._data_memory]
onward = []
for r in range(opts["repeats"]):
    twin = copy.deepcopy(learner)
    torch.manual_seed(1000 + r)
    twin.incremental_train(dm)
    onward.append(nme_of(twin))
torch.save({"order": list(dm._class_order), "curve": curve, "onward": onward, "rows": rows,
            "targets": [int(t) for t in learner._targets_memory],
            "state": {k: v for k, v in learner._network.state_dict().items() if not k.startswith("convnet.fc.")}},
           opts["out"])
"""


def ours_onward(theirs: dict, seed: int, fork: int, repeats: int) -> tuple[float | None, list[float], dict]:
    """Our NME at the fork (PyCIL's network and exemplars, our class means) and after task `fork` per repeat, and
    what our engine ran on (trainer.device.machine and Engine.fast_paths)."""
    from methods import method_config
    from trainer.cli import parse_overrides
    from trainer.config_loader import load_config
    from trainer.device import machine
    from trainer.evaluation import evaluate
    from trainer.task_loop import SeedRun

    cfg = load_config(os.path.join(ROOT, "options", "icarl", "digits.yaml"),
                      parse_overrides(reference_icarl.BUDGET[2:] + ["--seed", str(seed)]), method_config)

    ran_on = {}

    def at_fork(run_seed: int):
        run = SeedRun(cfg, seed, torch.device("cpu"))
        data, method, engine = run.data, run.method, run.engine
        ran_on.update(machine(engine.device), **engine.fast_paths())
        assert list(data.class_order) == theirs["order"], (data.class_order, theirs["order"])
        for task in data.tasks[:fork]:  # our network grows its head to the fork's classes
            method.begin_task(task)
        names = list(method.network.state_dict())
        method.network.load_state_dict(dict(zip(names, theirs["state"].values())))
        rows, targets = np.asarray(theirs["rows"], dtype=np.int64), np.asarray(theirs["targets"], dtype=np.int64)
        assert (data.train_y[rows] == targets).all()
        method.memory.exemplars = {int(c): rows[targets == c] for c in np.unique(targets)}
        engine.seed = run_seed  # the batch orders of the task after the fork
        torch.manual_seed(run_seed)  # its new head rows
        return data, method, engine

    at = None
    if fork > 0:
        data, method, engine = at_fork(seed)
        method.class_means = method.memory.class_means(data, method.features_of(engine.infer))
        at = evaluate(method, engine, data, data.tasks[fork - 1], cfg)["nme"]["acc"]
    onward = []
    for r in range(repeats):
        data, method, engine = at_fork(1000 + r)
        task = data.tasks[fork]
        method.begin_task(task)
        method.to(engine.device)
        engine.train(method, task, method.stages(task, data.dataset("train", data.indices("train", task.classes)),
                                                 engine.infer))
        method.end_task(task, engine.infer)
        onward.append(evaluate(method, engine, data, task, cfg)["nme"]["acc"])
    return at, onward, ran_on


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pycil", required=True, help="a PyCIL checkout with a digits entry")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fork", type=int, default=4, help="tasks PyCIL trains before the fork (0-4)")
    parser.add_argument("--repeats", type=int, default=4, help="trainings of the next task per framework")
    args = parser.parse_args(argv)
    if not 0 <= args.fork <= 4:
        parser.error("--fork is a task index of the 5-task budget: 0..4")
    torch.set_num_threads(1)
    theirs = reference_icarl.run_in_pycil(args.pycil, PYCIL_SIDE, args.seed, 10, fork=args.fork,
                                          repeats=args.repeats)
    at, onward, environment = ours_onward(theirs, args.seed, args.fork, args.repeats)
    print(f"ours ran on: {describe(environment)}; PyCIL: its own loops, float32, no autocast, 1 thread")
    print(f"seed {args.seed}: PyCIL's NME per task up to the fork {theirs['curve']}; ours at the fork, from the "
          f"same network and exemplars: {at}")
    print(f"NME after task {args.fork}, {args.repeats} trainings each from that state:")
    for name, values in (("PyCIL", theirs["onward"]), ("ours", onward)):
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | mean {format_mean_std(mean_std(values))} |")
    return {"curve": theirs["curve"], "at_fork": at, "pycil": theirs["onward"], "ours": onward}


if __name__ == "__main__":
    main()
