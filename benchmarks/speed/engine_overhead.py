"""Overhead of the shared training loop against a bare PyTorch loop.

Both train the same network (resnet32 + linear head) on the same in-memory data for the same number of steps
with the same optimiser, in one process, alternating bare/engine for several rounds; the script prints the
images/s of each and the median ratio engine / bare, after what they ran on: the machine and the engine's
precision and fast paths (trainer.device.machine, Engine.fast_paths; the engine runs without autocast, like the
bare loop, and with channels-last inputs and weights). It asserts nothing about absolute time.

    python -m benchmarks.speed.engine_overhead [--rounds 5] [--steps 40] [--batch_size 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from backbone import build_backbone
from backbone.incremental_net import IncrementalNet
from benchmarks.environment import describe
from methods.base import Method
from trainer.device import machine, resolve_device
from trainer.engine.engine import Engine
from utils.types import OptimConfig, Stage, Task


class _CE(Method):
    """The smallest method: cross-entropy on a given network (no config, no data manager)."""

    def __init__(self, network):
        torch.nn.Module.__init__(self)
        self.network, self.memory = network, None

    def training_step(self, x, y):
        return {"ce": F.cross_entropy(self.network(x)["logits"], y)}


def bare_loop(network, dataset, opt: OptimConfig, device) -> None:
    optimizer = torch.optim.SGD(network.parameters(), lr=opt.lrate, momentum=opt.opt_mom)
    network.train()
    for x, y in DataLoader(dataset, batch_size=opt.batch_size, shuffle=True, drop_last=True):
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(network(x)["logits"], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per measurement")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--img_size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    logging.getLogger("cl").setLevel(logging.WARNING)
    torch.manual_seed(0)
    n = args.steps * args.batch_size
    dataset = TensorDataset(torch.randn(n, 3, args.img_size, args.img_size), torch.randint(0, 10, (n,)))
    network = IncrementalNet(build_backbone("resnet32"))
    network.expand_head(10)
    network.to(device)
    method = _CE(network)
    opt = OptimConfig(epochs=1, lrate=0.01, batch_size=args.batch_size)
    engine = Engine(device, num_workers=0, amp=False)
    task = Task(0, 0, 10, 1)
    bare_loop(network, dataset, opt, device)  # warm-up
    speeds = {"bare": [], "engine": []}
    for _ in range(args.rounds):
        for name in ("bare", "engine"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if name == "bare":
                bare_loop(network, dataset, opt, device)
            else:
                engine.fit(method, task, Stage("train", lambda: dataset, opt, method.training_step))
            if device.type == "cuda":
                torch.cuda.synchronize()
            speeds[name].append(n / (time.perf_counter() - start))
    ratios = [e / b for e, b in zip(speeds["engine"], speeds["bare"])]
    ratio = statistics.median(ratios)
    print(f"device {device}, {args.steps} steps x batch {args.batch_size}, {args.rounds} alternating rounds")
    print(f"engine: {describe({**machine(device), **engine.fast_paths()})}")
    dtype = str(dataset.tensors[0].dtype).removeprefix("torch.")
    print(f"  bare: {dtype}, no autocast, contiguous inputs, the same network"
          + (" (its convolution weights channels-last once the engine has run)" if engine.channels_last else ""))
    for name, values in speeds.items():
        print(f"{name:>6}: {statistics.median(values):8.1f} images/s (median; rounds: "
              f"{', '.join(f'{v:.0f}' for v in values)})")
    print(f"ratio engine / bare: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
