"""DER++ (dark_er) and GEM: replay of a memory through the loss (DER++: logits stored by reservoir sampling) or
through the gradient (GEM: the update projected so that no past task's memory loss rises); and the base class's
CE over each sample's own task and the settings replay methods refuse.

Known answers: DER++'s CE, logit MSE and buffer CE recomputed on a hand-filled buffer, and the logits it stores
being those from before the step; GEM's memory gradients recomputed by autograd of the CE formula, its applied
update never opposing one, and its projection against one memory matching the closed-form dual solution. The
formulas are in tests/formulas.py, the builders of a method on the digits fixture in tests/method_builders.py
(iCaRL, WA and BiC are in tests/test_distillation_methods.py).

To add a method of this family, copy the test of dark_er (test_der_plus_plus_losses_ce_logit_mse_and_buffer_ce).
"""
import math

import numpy as np
import pytest
import torch

from conftest import known_answer
from formulas import ce, close
from method_builders import build, build_tiny, perturb, positions, samples, start
from methods.multi_steps.gem import gem_project
from utils.losses import bounded_ce, class_task_bounds
from utils.memory import reservoir_slots
from utils.registry import UserError
from trainer.engine.engine import Engine
from utils.types import OptimConfig, Stage


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
    method, data = build_tiny("dark_er")
    task = data.tasks[0]
    method.begin_task(task)
    new = method.train_data(task, data.dataset("train", data.indices("train", task.classes)))
    for start in (0, 16):
        batch = torch.utils.data.default_collate([new[i] for i in range(start, start + 16)])
        method.training_step(*batch)
    assert len(method.memory) == 32 and float(method.memory.logits[:32].abs().sum()) > 0
    assert np.isin(method.memory.index[:32].numpy(), data.indices("train", task.classes)).all()
    restored, _ = build_tiny("dark_er")
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
        build_tiny(method, *overrides)


# ============================================================ DER++ ===============================================
@known_answer("dark_er")
def test_der_plus_plus_losses_ce_logit_mse_and_buffer_ce():
    method = build("dark_er", "--replay_batch_size", "6")
    start(method, 0)
    start(method, 1)
    perturb(method.network.fc, seed=1)
    memory = method.memory
    held = positions(method, [0, 1], 3)  # exactly one replay batch in the buffer: the draw is a permutation
    g = torch.Generator().manual_seed(2)
    stored = torch.randn(6, 10, generator=g)
    with torch.no_grad():
        memory.index[:6] = torch.as_tensor(held)
        memory.logits[:6] = stored
        memory.n_seen.fill_(6)
    x, y = samples(method, [2, 3])
    pos = torch.as_tensor(positions(method, [2, 3]))
    method.train()
    torch.manual_seed(5)
    losses = method.training_step(x, y, pos)
    torch.manual_seed(5)
    first, second = torch.randperm(6), torch.randperm(6)  # the two replay batches' draws of buffer slots
    # the buffer samples in the order the method drew them, read as it reads them (a batch of the train pool):
    # under bfloat16 a batch's order changes its BN statistics' rounding
    bx, by = method.data.dataset("train", held).batch(torch.arange(len(held)), torch.device("cpu"))
    assert set(losses) == {"ce", "mse", "buffer_ce"}
    close(losses["ce"], ce(method.network(x)["logits"], y, 0, 10))  # the head covers every class from the start
    close(losses["mse"], method.cfg.alpha * ((method.network(bx[first])["logits"] - stored[first]) ** 2).mean())
    close(losses["buffer_ce"], method.cfg.beta * ce(method.network(bx[second])["logits"], by[second], 0, 10))


@known_answer("dark_er")
def test_der_plus_plus_stores_the_logits_computed_before_the_step(precision_mode):
    method = build("dark_er")
    task = start(method, 0)
    x, y = samples(method, [0, 1], 8)
    pos = torch.as_tensor(positions(method, [0, 1], 8))
    method.train()
    with torch.no_grad():
        before = method.network(x)["logits"]
    batch = torch.utils.data.TensorDataset(x, y, pos)  # (x, y, train-pool position), as train_data yields
    opt = OptimConfig(epochs=1, lrate=0.5, batch_size=16)
    engine = Engine(torch.device("cpu"))
    engine.fit(method, task, Stage("train", lambda: batch, opt, method.training_step))
    assert len(method.memory) == 16
    slot_of = {p: s for s, p in enumerate(method.memory.index[:16].tolist())}
    stored = method.memory.logits[[slot_of[p] for p in pos.tolist()]]
    # bfloat16: the step's forward (channels-last, the batch in the epoch's order) and this one round differently,
    # by up to 0.047 on these logits (measured); the step moves them by over 100
    tol = 0.1 if precision_mode == "bfloat16" else 1e-4
    torch.testing.assert_close(stored, before.float(), atol=tol, rtol=tol)
    with torch.no_grad():
        after = method.network(x)["logits"]
    assert (after - before).abs().max() > 10 * tol  # the step moved the network: the stored logits are the old ones


# ============================================================ GEM =================================================
def _gem_with_memories():
    method = build("gem", "--replay_batch_size", "64", "--memory_per_class", "6")
    for t in range(3):
        start(method, t)
    method.memory.exemplars = {c: positions(method, [c], 6) for c in range(4)}
    return method, method.data.tasks[2]


@known_answer("gem")
def test_gem_ce_and_memory_gradients_are_the_gradients_of_each_past_tasks_memory_loss():
    method, task = _gem_with_memories()
    engine = Engine(torch.device("cpu"))
    new = method.data.dataset("train", positions(method, [4, 5], 4))
    stage, = method.stages(task, new, engine.infer)
    stage.data()  # loads the past tasks' memories
    x, y = samples(method, [4, 5], 4)
    method.train()
    losses = method.training_step(x, y)
    close(losses["ce"], ce(method.network(x)["logits"], y, 0, 6))
    params = [p for p in method.parameters() if p.requires_grad]
    for k, classes in enumerate(([0, 1], [2, 3])):
        mx, my = samples(method, classes, 6)
        with torch.autocast("cpu", enabled=False):  # GEM's memory gradients are float32 whatever autocast is on
            grads = torch.autograd.grad(ce(method.network(mx)["logits"], my, 0, 6).float(), params,
                                        allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
        torch.testing.assert_close(method.memory_grads[k], flat, atol=1e-5, rtol=1e-3)


@known_answer("gem")
def test_gem_applied_update_never_opposes_a_past_tasks_memory_gradient():
    method, task = _gem_with_memories()
    engine = Engine(torch.device("cpu"))
    params = [p for p in method.parameters() if p.requires_grad]
    flat = lambda: torch.cat([p.detach().flatten() for p in params]).clone()  # noqa: E731
    steps, conflicts = [], []
    project = method.before_optimizer_step

    def record_and_project():
        G = method.memory_grads.clone()
        g = torch.cat([p.grad.flatten() for p in params])
        conflicts.append(bool((G @ g < 0).any()))
        steps.append((flat(), G))
        project()

    method.before_optimizer_step = record_and_project
    new = method.data.dataset("train", positions(method, [4, 5], 24))
    stage, = method.stages(task, new, engine.infer)
    engine.fit(method, task, Stage("train", stage.data, stage.optim.replace(epochs=1, batch_size=8), stage.step))
    assert len(steps) == 6 and any(conflicts)  # learning the new classes does conflict with the old memories
    after = [s[0] for s in steps[1:]] + [flat()]
    for (theta, G), theta_next in zip(steps, after):
        update = theta_next - theta  # what the optimiser actually applied: -lr * g~
        assert update.abs().max() > 0
        assert float((G @ update).max()) <= 1e-6 * float(G.norm() * update.norm())  # <g_k, g~> >= 0 for every k


@known_answer("gem")
def test_gem_refuses_optimisers_that_would_change_the_projected_update():
    for overrides in (["--opt_mom", "0.9"], ["--weight_decay", "0.0005"], ["--opt_type", "adam"],
                      ["--init_opt_mom", "0.5"]):
        with pytest.raises(UserError, match="plain SGD"):
            build("gem", *overrides)


@known_answer("gem")
@pytest.mark.parametrize("strength", [0.0, 0.5])
def test_gem_projection_against_one_memory_has_the_closed_form_solution(strength):
    """With one memory gradient G the dual QP min_v 1/2 (|G|^2 + eps) v^2 + (g.G) v, v >= h, gives
    v = max(h, -(g.G) / (|G|^2 + eps)) and the update g~ = g + v G."""
    method, _ = _gem_with_memories()
    method.cfg = method.cfg.replace(memory_strength=strength)
    params = [p for p in method.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(9)
    G = torch.randn(1, n, generator=g)
    grad = -0.2 * G[0] + 0.3 * torch.randn(n, generator=g)  # conflicts, g.G < 0, with -(g.G)/|G|^2 ~ 0.2
    for p, part in zip(params, grad.split([p.numel() for p in params])):
        p.grad = part.view_as(p).clone()
    method.memory_grads = G.clone()
    method.before_optimizer_step()
    applied = torch.cat([p.grad.flatten() for p in params])
    free = float(-(grad.double() @ G[0].double()) / (G[0].double() @ G[0].double() + 1e-3))
    assert 0 < free < 0.5  # with memory strength 0.5 the bound is active, without it is not
    torch.testing.assert_close(applied, grad + max(strength, free) * G[0], atol=1e-4, rtol=1e-4)
