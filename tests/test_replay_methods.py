"""Unit tests of the replay/distillation methods' parts: losses on hand numbers, WA's alignment, BiC's bias
stage, GEM's projection and DER's reservoir."""
import math
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, run_stage
from datasets.scenario import DataManager
from methods import build_method, method_config
from methods.multi_steps.bic import balanced_split
from methods.multi_steps.gem import gem_project
from methods.multi_steps.wa import align_weights
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config
from utils.losses import bounded_ce, class_task_bounds, kd_loss
from utils.memory import reservoir_slots
from utils.registry import UserError
from trainer.engine.engine import Engine
from utils.types import OptimConfig


def build(method: str, *overrides: str):
    """The method of options/<method>/digits.yaml on the TINY settings (two tasks of 5 classes), with no task
    started."""
    cfg = load_config(os.path.join(ROOT, "options", method, "digits.yaml"),
                      parse_cli_overrides([*TINY, *overrides]), method_config)
    data = DataManager(cfg, seed=1)
    return build_method(cfg, data), data


def test_kd_loss_on_hand_numbers():
    # T = 2 halves both logit rows: targets softmax([0, 0]) = (1/2, 1/2), log-probs log(1/4), log(3/4)
    ln3 = math.log(3.0)
    kd = kd_loss(torch.tensor([[0.0, 2 * ln3]]), torch.tensor([[0.0, 0.0]]), T=2.0)
    assert float(kd) == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-6)
    # against itself KD is the entropy of softmax(z / T) = (1/4, 3/4)
    same = kd_loss(torch.tensor([[0.0, 2 * ln3]]), torch.tensor([[0.0, 2 * ln3]]), T=2.0)
    assert float(same) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)


def test_task_ce_only_sees_the_samples_own_task():
    class Task:  # two tasks: classes [0, 2) and [2, 4)
        def __init__(self, known, total):
            self.known, self.total = known, total

    bounds = class_task_bounds([Task(0, 2), Task(2, 4)])
    assert bounds.tolist() == [[0, 2], [0, 2], [2, 4], [2, 4]]
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([1, 2])
    loss = bounded_ce(logits, y, *bounds[y].unbind(1))
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2  # -2+lse(1,2); -3+lse(3,4)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_weight_aligning_equalises_mean_norms():
    torch.manual_seed(0)
    weight, bias = torch.rand(10, 8), torch.rand(10)
    weight[6:] *= 3.0  # new classes with larger rows, as after imbalanced training
    new_bias = bias[6:].clone()
    gamma = align_weights(weight, bias, known=6)
    norms = torch.linalg.vector_norm(weight, dim=1)
    assert gamma < 1.0
    assert float(norms[:6].mean()) == pytest.approx(float(norms[6:].mean()), rel=1e-5)
    assert torch.allclose(bias[6:], gamma * new_bias)


def test_wa_clips_the_head_to_non_negative_weights():
    method, data = build("wa")
    task = data.tasks[0]
    method.begin_task(task)
    x = torch.stack([data.dataset("train", [i])[0][0] for i in range(4)])
    method.training_step(x, torch.zeros(4, dtype=torch.long))
    assert float(method.network.fc.weight.detach().min()) >= 0.0


def test_bic_bias_stage_trains_only_the_newest_alpha_beta():
    method, data = build("bic")
    for task in data.tasks:
        method.begin_task(task)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    engine = Engine(torch.device("cpu"))
    subset = data.dataset("train", data.indices("train", range(data.tasks[-1].total))[::20])
    run_stage(method, engine, data.tasks[-1], "bias", subset, data=lambda: subset,
              optim=OptimConfig(epochs=2, lrate=0.1, batch_size=16, weight_decay=0.0005))
    changed = {k for k, v in method.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"network.bias_layers.1.alpha", "network.bias_layers.1.beta"}
    assert not any(p.requires_grad for p in method.network.bias_layers.parameters())  # not in stage 1


def test_bic_holds_out_the_same_number_of_every_class():
    labels = np.repeat(np.arange(4), [30, 12, 50, 7])
    pool = np.arange(1000, 1000 + len(labels))
    rest, held = balanced_split(pool, labels, 5, np.random.default_rng([1, 1]))
    assert np.bincount(labels[held - 1000]).tolist() == [5, 5, 5, 5]
    assert sorted(np.concatenate([rest, held]).tolist()) == pool.tolist()
    again = balanced_split(pool, labels, 5, np.random.default_rng([1, 1]))[1]
    assert np.array_equal(held, again)


def test_gem_projection_leaves_no_memory_gradient_conflicting():
    torch.manual_seed(0)
    G = torch.randn(3, 50)
    g = -G.sum(0) + 0.1 * torch.randn(50)  # conflicts with every memory gradient
    assert (G @ g < 0).all()
    for strength in (0.0, 0.5):
        exact = gem_project(g, G, strength, eps=0.0)
        assert (G @ exact >= -1e-6).all()
        # the 1e-3 ridge that keeps the QP positive definite leaves a slack of 1e-3 * v (v ~ 1 here)
        assert (G @ gem_project(g, G, strength) >= -2e-3).all()
    free = G[0] + G[1] + G[2]  # already agrees with every memory: unchanged without memory strength
    assert torch.allclose(gem_project(free, G, 0.0), free, atol=1e-4)


def test_der_buffer_round_trips_through_a_checkpoint():
    method, data = build("dark_er")
    task = data.tasks[0]
    method.begin_task(task)
    new = method.train_data(task, data.dataset("train", data.indices("train", task.classes)))
    for start in (0, 16):
        batch = torch.utils.data.default_collate([new[i] for i in range(start, start + 16)])
        method.training_step(*batch)
    assert len(method.memory) == 32 and float(method.memory.logits[:32].abs().sum()) > 0
    assert np.isin(method.memory.index[:32].numpy(), data.indices("train", task.classes)).all()
    restored, _ = build("dark_er")
    restored.begin_task(task)
    restored.load_state_dict(method.state_dict())
    restored.load_extra_state(method.extra_state())
    assert len(restored.memory) == 32
    assert torch.equal(restored.memory.index, method.memory.index)
    assert torch.equal(restored.memory.logits, method.memory.logits)


def test_reservoir_keeps_a_uniform_sample():
    torch.manual_seed(0)
    size, stream, batch, trials = 40, 400, 20, 200
    kept = torch.zeros(stream)
    for _ in range(trials):
        buffer = torch.full((size,), -1)
        for start in range(0, stream, batch):
            slots, items = reservoir_slots(start, batch, size)
            buffer[slots] = start + items
            if start + batch <= size:  # filling: every item is kept, in order
                assert buffer[: start + batch].tolist() == list(range(start + batch))
        assert (buffer >= 0).all() and len(set(buffer.tolist())) == size
        kept[buffer] += 1
    rate = kept / trials  # each item should be kept with probability size / stream = 0.1
    assert float(rate[: stream // 2].mean()) == pytest.approx(0.1, abs=0.01)
    assert float(rate[stream // 2:].mean()) == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("method, overrides", [("icarl", ["--apply_nme", "false"]),
                                               ("dark_er", ["--sampling_method", "herding"]),
                                               ("bic", ["--memory_size", "0"]),
                                               ("gem", ["--fixed_memory", "false", "--memory_size", "0"])])
def test_methods_reject_settings_they_cannot_run(method, overrides):
    with pytest.raises(UserError):
        build(method, *overrides)
