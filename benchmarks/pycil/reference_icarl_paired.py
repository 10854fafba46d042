"""Our iCaRL against PyCIL's, piece by piece on the same inputs: the same initial weights, the same batches, the
same trained network, so that any difference of code shows and the random draws of a run (initial weights,
batch order) do not.

    python -m benchmarks.pycil.reference_icarl_paired --pycil DIR [--seed 1] [--epochs 10] [--steps 3]

DIR is a PyCIL checkout with a `digits` entry (see benchmarks/pycil/README.md). PyCIL runs in its own process
(its modules are imported from DIR, nothing of it is copied here) and saves: its initial network and first
training batches, its network after `--steps` SGD steps of task 0 and of task 1 (CE + KD against its frozen
task-0 network) in float64, its network after `--epochs` epochs of task 0, and the exemplars and class means it
then selects. This script loads each into our iCaRL (options/icarl/digits.yaml on the budget of
benchmarks.pycil.reference_icarl) and prints how far ours lands from PyCIL's:

- forward and backward from PyCIL's initial weights on its first batch (float32): features, loss, gradients;
- `--steps` steps of task 0 and of task 1 from PyCIL's weights on PyCIL's batches (float64, so that rounding
  does not grow: at lr 0.1 float32 differences of 1e-6 become 1e-1 within a few steps);
- herding and class means after task 0, both from PyCIL's trained network: the same exemplars, in the same order?

It first prints what ours ran on: the CPU model and the precision and fast paths of our engine (its inference
computes the features of herding and class means, in bfloat16 autocast on a CPU with native bfloat16) in the
float32 and the float64 part; PyCIL's side runs its own loops, float32 (float64 for the steps), no autocast.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from benchmarks.environment import describe
from benchmarks.pycil import reference_icarl
from benchmarks.run import ROOT

# run in the PyCIL checkout after reference_icarl.PYCIL_PRELUDE: its DataManager, iCaRL learner and loops
PYCIL_SIDE = r"""
from torch.utils.data import DataLoader
S, E, K = opts["seed"], opts["epochs"], opts["steps"]

def as64(batches):
    return [(i, x.double(), y) for i, x, y in batches]

def steps64(learner, batches, test):
    # K steps of learner's own loop in float64 on a copy; returns the copy's weights
    torch.set_default_dtype(torch.float64)
    try:
        twin = copy.deepcopy(learner)
        twin._network.double()
        if twin._old_network is not None:
            twin._old_network.double()
        if twin._cur_task == 1:
            twin._network.update_fc(4)
        start = {k: v.clone() for k, v in twin._network.state_dict().items()}
        icarl.epochs = 1; icarl.init_epoch = 1
        twin._train(as64(batches), as64(test))
        icarl.epochs = icarl.init_epoch = E
        return start, {k: v.clone() for k, v in twin._network.state_dict().items()}
    finally:
        torch.set_default_dtype(torch.float32)

torch.manual_seed(S); np.random.seed(S)
dm = DataManager("digits", True, S, 2, 2)
learner = icarl.iCaRL(dict(opts["config"], device=[torch.device("cpu")]))
learner._cur_task, learner._total_classes = 0, 2
learner._network.update_fc(2)
out = {"order": list(dm._class_order), "keys0": list(learner._network.state_dict())}
train0 = DataLoader(dm.get_dataset(np.arange(0, 2), source="train", mode="train"), batch_size=32, shuffle=True)
test0 = list(DataLoader(dm.get_dataset(np.arange(0, 2), source="test", mode="test"), batch_size=32))
first = [b for _, b in zip(range(K), train0)]
out["batches0"] = [(x, y) for _, x, y in first]
out["init0"], out["steps0"] = steps64(learner, first, test0)
learner._network.train()
o = learner._network(first[0][1])
loss = torch.nn.functional.cross_entropy(o["logits"], first[0][2])
loss.backward()
out["probe"] = {"features": o["features"].detach(), "loss": float(loss),
                "grads": {n: p.grad.clone() for n, p in learner._network.named_parameters() if p.grad is not None}}
learner._network.zero_grad(set_to_none=True)
learner._train(train0, test0)
out["trained0"] = {k: v.clone() for k, v in learner._network.state_dict().items()}
learner.build_rehearsal_memory(dm, learner.samples_per_class)
out["exemplars"] = {}
for c in range(2):
    pool = dm._train_data[dm._train_targets == c]
    kept = learner._data_memory[learner._targets_memory == c]
    out["exemplars"][c] = [int(np.flatnonzero((pool == m).all(axis=(1, 2, 3)))[0]) for m in kept]
out["class_means"] = torch.from_numpy(learner._class_means[:2])
learner.after_task()
learner._cur_task, learner._total_classes = 1, 4
train1 = DataLoader(dm.get_dataset(np.arange(2, 4), source="train", mode="train", appendent=learner._get_memory()),
                    batch_size=32, shuffle=True)
test1 = list(DataLoader(dm.get_dataset(np.arange(0, 4), source="test", mode="test"), batch_size=32))
first1 = [b for _, b in zip(range(K), train1)]
out["batches1"] = [(x.double(), y) for _, x, y in first1]
out["init1"], out["steps1"] = steps64(learner, first1, test1)
out["keys1"] = list(out["init1"])
torch.save(out, opts["out"])
"""


def relative(ours: dict, theirs: dict, keys: list[str]) -> float:
    """Largest |ours - theirs| / max|theirs| over the tensors of our state dict, matched to PyCIL's by order."""
    worst = 0.0
    for (name, a), key in zip(ours.items(), keys):
        b = theirs[key].to(a.dtype)
        if a.is_floating_point():
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)))
    return worst


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pycil", required=True, help="a PyCIL checkout with a digits entry")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10, help="of task 0, before its exemplars are selected")
    parser.add_argument("--steps", type=int, default=3, help="SGD steps compared in float64, per task")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    theirs = reference_icarl.run_in_pycil(args.pycil, PYCIL_SIDE, args.seed, args.epochs, steps=args.steps)
    rows, environments = compare(theirs, args)
    print(f"iCaRL, ours against PyCIL on the same inputs (seed {args.seed}, reference_icarl's budget)")
    for part, env in environments.items():
        print(f"ours, {part} part: {describe(env)}")
    print("PyCIL: its own loops, float32 (float64 for the SGD steps), no autocast, 1 thread")
    print("| piece | result |\n|---|---|")
    for piece, result in rows.items():
        print(f"| {piece} | {result} |")
    return rows


def compare(theirs: dict, args) -> tuple[dict, dict]:
    """The rows of the comparison, and the environment (trainer.device.machine and Engine.fast_paths) of our
    engine in each part, float32 and float64."""
    from methods import method_config
    from trainer.cli import parse_overrides
    from trainer.config_loader import load_config
    from trainer.device import machine
    from trainer.engine.optim import build_optimizer
    from trainer.task_loop import SeedRun
    from utils.precision import default_dtype

    keys0 = [k for k in theirs["keys0"] if not k.startswith("convnet.fc.")]  # its backbone's unused classifier
    keys1 = [k for k in theirs["keys1"] if not k.startswith("convnet.fc.")]
    rows, environments = {}, {}

    def fresh(precision: str):
        overrides = reference_icarl.BUDGET[2:] + ["--seed", str(args.seed), "--precision", precision]
        cfg = load_config(os.path.join(ROOT, "options", "icarl", "digits.yaml"), parse_overrides(overrides),
                          method_config)
        with default_dtype(precision):
            run = SeedRun(cfg, args.seed, torch.device("cpu"))
        data, method, engine = run.data, run.method, run.engine
        assert list(data.class_order) == theirs["order"], (data.class_order, theirs["order"])
        method.begin_task(data.tasks[0])
        environments[precision] = {**machine(engine.device), **engine.fast_paths()}
        return data, method, engine

    def load(method, state, keys):
        method.network.load_state_dict({a: state[b] for a, b in zip(method.network.state_dict(), keys)})

    def steps(method, engine, data, task, batches):
        stage = method.stages(task, data.dataset("train", data.indices("train", task.classes)), engine.infer)[0]
        optimizer = build_optimizer([p for p in method.parameters() if p.requires_grad], stage.optim)
        method.train()
        for x, y in batches:
            loss = sum(stage.step(x.to(torch.get_default_dtype()), y).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.before_optimizer_step()
            optimizer.step()

    # forward and backward, float32
    data, method, engine = fresh("float32")
    load(method, theirs["init0"], keys0)
    method.network.train()
    x, y = theirs["batches0"][0]
    out = method.network(x)
    loss = torch.nn.functional.cross_entropy(out["logits"], y)
    loss.backward()
    grads = {n: p.grad for n, p in method.network.named_parameters()}
    probe = theirs["probe"]
    worst = max(float((g - probe["grads"][k]).abs().max() / probe["grads"][k].abs().max())
                for g, k in zip(grads.values(), [k for k in keys0 if k in probe["grads"]]))
    rows["forward + backward, same weights and batch (float32)"] = (
        f"features {float((out['features'] - probe['features']).abs().max()):.1e} apart, loss {loss.item():.6f} vs "
        f"{probe['loss']:.6f}, gradients {worst:.1e} (relative)")
    # herding and class means from PyCIL's trained task-0 network, float32
    load(method, theirs["trained0"], keys0)
    method.end_task(data.tasks[0], engine.infer)
    same = []
    for c in range(2):
        pool = data.indices("train", [c])
        ours = [int(np.flatnonzero(pool == p)[0]) for p in method.memory.exemplars[c]]
        same.append(ours == theirs["exemplars"][c])
    rows["exemplars after task 0 (herding, PyCIL's network)"] = (
        f"{'the same' if all(same) else 'DIFFERENT'} {len(ours)} per class, in the same order: {all(same)}")
    means = float((method.class_means[:2].double() - theirs["class_means"]).abs().max())
    rows["class means (normalised exemplar features)"] = f"{means:.1e} apart"
    # SGD steps in float64: task 0 (CE), then task 1 (CE + KD) from PyCIL's task-0 network
    with default_dtype("float64"):
        data, method, engine = fresh("float64")
        load(method, theirs["init0"], keys0)
        steps(method, engine, data, data.tasks[0], theirs["batches0"])
        rows[f"task 0, {args.steps} SGD steps (float64)"] = \
            f"weights {relative(method.network.state_dict(), theirs['steps0'], keys0):.1e} apart (relative)"
        load(method, theirs["trained0"], keys0)
        method.end_task(data.tasks[0], engine.infer)
        method.begin_task(data.tasks[1])
        load(method, theirs["init1"], keys1)
        steps(method, engine, data, data.tasks[1], theirs["batches1"])
        rows[f"task 1, {args.steps} SGD steps of CE + KD (float64)"] = \
            f"weights {relative(method.network.state_dict(), theirs['steps1'], keys1):.1e} apart (relative)"
    return rows, environments


if __name__ == "__main__":
    main()
