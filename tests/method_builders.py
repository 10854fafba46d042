"""Builders of a registered method on the digits fixture, for the known-answer tests of every family file.

`build` makes the method of options/<method>/digits.yaml at the native 8 px (add `*VIT` for the ViT prompt methods,
16 px: one patch), two classes per task in the identity class order, so class c belongs to task c // 2; `start`
begins a task, `perturb` moves the weights by seeded noise, `samples` and `positions` pick fixed training samples.
`build_tiny` makes a method on the registry-wide TINY settings (two tasks of 5 classes, 16 px) instead.
"""
import os

import numpy as np
import torch

from conftest import ROOT, TINY
from datasets.scenario import DataManager
from methods import METHODS, build_method, method_config
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config

# digits at the native 8 px, 2 classes per task, the identity class order: class c belongs to task c // 2
BASE = ["--device", "cpu", "--seed", "1", "--init_cls", "2", "--increment", "2", "--img_size", "8",
        "--shuffle", "false"]
VIT = ["--img_size", "16"]


def build(method, *overrides):
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "options", method, "digits.yaml"), parse_cli_overrides([*BASE, *overrides]),
                      method_config)
    single = METHODS.meta(method)["method_type"] in ("single_step", "pretrain")
    return build_method(cfg, DataManager(cfg, seed=1, single_task=single))


def start(method, index):
    method.begin_task(method.data.tasks[index])
    return method.task


def perturb(module, seed, scale=0.3):
    """Move every trainable float parameter by seeded noise (so student and teacher, old and new rows differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(scale * torch.randn(p.shape, generator=g))


def samples(method, classes, per_class=3):
    """The first `per_class` train samples of each class, as a batch (x, y)."""
    data = method.data
    idx = np.concatenate([data.indices("train", [c])[:per_class] for c in classes])
    items = [data.dataset("train", idx, augment=False)[i] for i in range(len(idx))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])


def positions(method, classes, per_class=3):
    return np.concatenate([method.data.indices("train", [c])[:per_class] for c in classes])


def build_tiny(method: str, *overrides: str):
    """(method, data manager): the method of options/<method>/digits.yaml on the TINY settings (two tasks of 5
    classes), with no task started."""
    cfg = load_config(os.path.join(ROOT, "options", method, "digits.yaml"),
                      parse_cli_overrides([*TINY, *overrides]), method_config)
    data = DataManager(cfg, seed=1)
    return build_method(cfg, data), data
