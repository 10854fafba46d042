"""contrastive_pretrain (MoCo v2, SimSiam): the losses from their formulas, the loss falling, the features beating a
random backbone under a linear probe, and the written file loading into every method (and not into another
architecture)."""
import glob
import math
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from backbone import build_backbone
from backbone.resnet_cifar import ResNet32
from conftest import ROOT
from datasets.scenario import DataManager
from methods import METHODS, build_method, method_config
from utils.config import load_config, parse_cli_overrides
from utils.losses import info_nce, simsiam_loss
from utils.registry import UserError
from utils.seed import set_seed
from utils.train_loop import Engine


# ---- the losses, recomputed from the papers' formulas ----
def test_info_nce_known_answer():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]])
    T = 0.5
    # -log( exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.n_j/T)) ), mean over the batch; by hand:
    # query 1: q.k+ = 0.8, q.n = (0, -1, 0.6); query 2: q.k+ = 0.8, q.n = (0.8, -0.6, -0.28)
    first = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(0.0) + math.exp(-2.0) + math.exp(1.2)))
    second = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(1.6) + math.exp(-1.2) + math.exp(-0.56)))
    expected = (first + second) / 2
    q.requires_grad_(True)
    k.requires_grad_(True)
    loss = info_nce(q, k, queue, T)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert q.grad is not None and k.grad is None  # the keys are constants


def test_simsiam_loss_known_answer_and_stop_gradient():
    p1, p2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [3.0, 4.0]])
    z1, z2 = torch.tensor([[1.0, 1.0], [0.0, -1.0]]), torch.tensor([[2.0, 0.0], [4.0, 3.0]])

    def cos(a, b):
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    d12 = -(cos(p1[0], z2[0]) + cos(p1[1], z2[1])) / 2  # D(p1, z2) = -(1 + 7/(sqrt2 * 5)) / 2
    d21 = -(cos(p2[0], z1[0]) + cos(p2[1], z1[1])) / 2  # D(p2, z1) = -(1/sqrt2 - 4/5) / 2
    assert d12 == pytest.approx(-(1 + 7 / (math.sqrt(2) * 5)) / 2)
    assert d21 == pytest.approx(-(1 / math.sqrt(2) - 0.8) / 2)
    tensors = [t.clone().requires_grad_(True) for t in (p1, p2, z1, z2)]
    loss = simsiam_loss(*tensors)
    assert float(loss) == pytest.approx(0.5 * d12 + 0.5 * d21, rel=1e-6)
    loss.backward()
    assert tensors[0].grad is not None and tensors[2].grad is None and tensors[3].grad is None


# ---- training ----
def make(name, *overrides):
    argv = ["--device", "cpu", *overrides]
    cfg = load_config(os.path.join(ROOT, "options", name, "digits.yaml"), parse_cli_overrides(argv), method_config)
    set_seed(1)
    data = DataManager(cfg, seed=1, single_task=True)
    method = build_method(cfg, data)
    method.task = data.tasks[0]
    return method, data


class LossLog:
    def __init__(self):
        self.losses = []

    def after_epoch(self, end):
        self.losses.append(sum(end.losses.values()))


@pytest.mark.parametrize("mode", ["moco_v2", "simsiam"])
def test_the_loss_falls(mode):
    method, data = make("contrastive_pretrain", "--mode", mode, "--K", "128", "--proj_dim", "64", "--pred_dim", "16")
    engine, log = Engine(torch.device("cpu")), LossLog()
    engine.register(log)
    subset = data.indices("train", range(10))[:256]
    stage = method.stages(data.tasks[0], None, engine)[0]
    import dataclasses

    two_views = method.two_view_data(data.tasks[0])
    small = torch.utils.data.Subset(two_views, subset)
    engine.fit(method, data.tasks[0], dataclasses.replace(stage, data=lambda: small,
                                                          optim=stage.optim.replace(epochs=6, batch_size=32)))
    assert len(log.losses) == 6
    assert log.losses[-1] < log.losses[0] - (0.3 if mode == "moco_v2" else 0.2), log.losses
