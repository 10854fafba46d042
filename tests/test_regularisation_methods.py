"""LwF and EWC: class-incremental learning without any stored sample, the old classes protected by a term of the
loss alone (LwF: distillation of the frozen previous network's outputs on the new data; EWC: a quadratic penalty
on moving the weights that mattered, weighted by the diagonal empirical Fisher).

Known answers: LwF's step (CE over the new classes with shifted targets, plus lambda * KD_T over the old ones) on a
fixed batch with a perturbed student and teacher; EWC's Fisher against per-sample gradients taken one sample at a
time with autograd in float64, its online accumulation gamma * F_old + F_new and its anchor, its penalty
lambda/2 * sum F (theta - theta*)^2 with the new head rows free, and its step CE (new or seen classes) + penalty;
and EWC's Fisher and anchor surviving a checkpoint (and a bad one refused). The formulas are in tests/formulas.py,
the builders of a method on the digits fixture in tests/method_builders.py (class c belongs to task c // 2).

To add a method of this family, copy the test of LwF (test_lwf_ce_on_the_new_classes_plus_lambda_kd_on_the_old).
"""
import copy

import pytest
import torch
from torch import nn

from conftest import known_answer
from formulas import ce, close, kd, task_bounds
from method_builders import build, perturb, positions, samples, start
from trainer.engine.engine import Engine
from utils.modes import train_mode
from utils.registry import InvalidState


# ============================================================ LwF =================================================
@known_answer("lwf")
def test_lwf_ce_on_the_new_classes_plus_lambda_kd_on_the_old():
    # T and lambda away from their defaults (2, 1) and from each other, so that swapping or dropping one shows
    method = build("lwf", "--T", "3", "--lwf_lambda", "0.7")
    start(method, 0)
    x0, y0 = samples(method, range(2))
    method.train()
    first = method.training_step(x0, y0)
    assert set(first) == {"ce"}  # no teacher in the first task: plain CE over its classes
    close(first["ce"], ce(method.network(x0)["logits"], y0, 0, 2))
    perturb(method.network, seed=1)
    start(method, 1)
    perturb(method.network, seed=2)
    start(method, 2)  # known 4, seen 6; the teacher: the network as task 1 left it
    perturb(method.network, seed=3)
    x, y = samples(method, range(4, 6))  # LwF trains on the new classes only
    method.train()
    losses = method.training_step(x, y)
    z, z_old = method.network(x)["logits"], method.old_network(x)["logits"]
    assert set(losses) == {"ce", "kd"} and z.shape[1] == 6 and z_old.shape[1] == 4
    close(losses["ce"], ce(z, y, 4, 6))  # = CE of z[:, 4:6] against y - 4
    close(losses["kd"], 0.7 * kd(z[:, :4], z_old, 3.0))
    assert float(losses["kd"].detach()) > 0


# ============================================================ EWC =================================================
def _settle_batchnorm(network, x):
    """Running statistics of every BN layer = those of batch x (after perturbed weights, eval mode would otherwise
    run on the initial statistics and its logits reach 1e7)."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, its statistics
    with torch.no_grad(), train_mode(network):
        network(x)
    for m in norms:
        m.momentum = 0.1


def _fisher_reference(network, x, y, lo, hi):
    """name -> mean over the samples of the squared gradient of CE(z_i, y_i, [lo_i, hi_i)), one sample at a time
    with autograd, in float64, the network in eval mode (a copy of it)."""
    net = copy.deepcopy(network).double().eval()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = [p for p in net.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    lo = [lo] * len(y) if isinstance(lo, int) else lo
    hi = [hi] * len(y) if isinstance(hi, int) else hi
    with torch.autocast("cpu", enabled=False):
        for i in range(len(y)):
            loss = ce(net(x[i:i + 1].double())["logits"], y[i:i + 1], lo[i], hi[i])
            for acc, g in zip(sums, torch.autograd.grad(loss, params)):
                acc += g * g
    return {n: s / len(y) for n, s in zip(names, sums)}


def _known_fisher(method, seed):
    """A stand-in for the Fisher pass: seeded positive values for every parameter, and the positions it was asked
    for."""
    asked = []

    def fisher(positions, infer):
        asked.append(None if positions is None else sorted(positions.tolist()))
        g = torch.Generator().manual_seed(seed)
        return {n: torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                for n, p in method.network.named_parameters()}

    return fisher, asked


def _buffers(holder):
    return {n.replace("__", "."): b.detach().clone() for n, b in holder.named_buffers()}


@known_answer("ewc")
@pytest.mark.parametrize("incre_type", ["cil", "til"])
def test_ewc_fisher_is_the_mean_squared_per_sample_gradient_of_the_true_labels_log_likelihood(incre_type):
    method = build("ewc", "--incre_type", incre_type)
    start(method, 0)
    perturb(method.network, seed=1, scale=0.1)
    start(method, 1)  # 4 seen classes
    perturb(method.network, seed=2, scale=0.1)
    x, y = samples(method, range(4), per_class=2)
    _settle_batchnorm(method.network, x)
    method.train()  # the Fisher pass must put the network in eval mode itself (BN on its running statistics)
    fisher = method.empirical_fisher(positions(method, range(4), per_class=2), Engine(torch.device("cpu")).infer)
    bounds = (0, 4) if incre_type == "cil" else task_bounds(y)
    expected = _fisher_reference(method.network, x, y, *bounds)
    assert set(fisher) == set(expected) == {n for n, _ in method.network.named_parameters()}
    for name, value in fisher.items():  # float32 with autocast off, against float64: whatever the test's precision
        assert value.dtype == torch.float32, name
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-3, atol=1e-5 * scale, msg=name)
    assert all(float(v.sum()) > 0 for v in expected.values())


@known_answer("ewc")
def test_ewc_accumulates_the_fisher_online_clips_it_and_anchors_the_weights_after_each_task():
    method = build("ewc", "--ewc_gamma", "0.3", "--fisher_max", "0.9")
    infer = Engine(torch.device("cpu")).infer
    task = start(method, 0)
    perturb(method.network, seed=1)
    method.empirical_fisher, asked = _known_fisher(method, seed=5)  # uniform in [0, 1): a tenth above 0.9
    method.after_task(task, infer)
    first = method.empirical_fisher(None, None)  # the same values again
    assert asked[0] == sorted(method.data.indices("train", [0, 1]).tolist())  # the task's own train samples
    theta0 = {n: p.detach().clone() for n, p in method.network.named_parameters()}
    fisher, anchor = _buffers(method.fisher), _buffers(method.anchor)
    for name in theta0:
        torch.testing.assert_close(fisher[name], first[name].clamp(max=0.9), rtol=0, atol=0)  # min(0.3 * 0 + F_0, 0.9)
        torch.testing.assert_close(anchor[name], theta0[name], rtol=0, atol=0)
    assert float(fisher["fc.weight"].max()) == pytest.approx(0.9)

    task = start(method, 1)  # the head grows from 2 to 4 rows; the new rows get F = 0
    assert method.fisher.fc__weight.shape == (4, 64)
    assert float(method.fisher.fc__weight[2:].abs().sum()) == 0 and float(method.fisher.fc__bias[2:].abs().sum()) == 0
    perturb(method.network, seed=2)
    method.empirical_fisher, asked = _known_fisher(method, seed=6)
    method.after_task(task, infer)
    second = method.empirical_fisher(None, None)
    assert asked[0] == sorted(method.data.indices("train", [2, 3]).tolist())
    fisher, anchor = _buffers(method.fisher), _buffers(method.anchor)
    for name, p in method.network.named_parameters():
        old = torch.zeros_like(p, dtype=torch.float64)
        old[tuple(slice(0, s) for s in first[name].shape)] = first[name].clamp(max=0.9)  # where they existed
        expected = (0.3 * old + second[name].double()).clamp(max=0.9)
        torch.testing.assert_close(fisher[name].double(), expected, rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(anchor[name], p.detach(), rtol=0, atol=0, msg=name)


def _ewc_after_one_task(*overrides):
    """EWC in task 1 (4 seen classes) with a known Fisher F_0 (clipped at digits.yaml's fisher_max) and anchor
    theta_0 from task 0, then perturbed."""
    method = build("ewc", *overrides)
    task = start(method, 0)
    perturb(method.network, seed=1)
    method.empirical_fisher, _ = _known_fisher(method, seed=7)
    method.after_task(task, None)
    f0 = {n: f.clamp(max=method.cfg.fisher_max) for n, f in method.empirical_fisher(None, None).items()}  # clipped
    theta0 = {n: p.detach().clone() for n, p in method.network.named_parameters()}
    start(method, 1)
    perturb(method.network, seed=2, scale=0.05)
    return method, f0, theta0


def _penalty(lam, network, f0, theta0):
    """lam / 2 * sum_i F_i (theta_i - theta0_i)^2 over the entries that existed in task 0 (old head rows only)."""
    total = torch.zeros((), dtype=torch.float64)
    for name, p in network.named_parameters():
        old = tuple(slice(0, s) for s in theta0[name].shape)
        total += (f0[name].double() * (p.detach()[old].double() - theta0[name].double()) ** 2).sum()
    return lam / 2 * total


@known_answer("ewc")
def test_ewc_penalty_is_half_lambda_times_the_fisher_weighted_squared_distance_new_rows_free():
    method, f0, theta0 = _ewc_after_one_task("--ewc_lambda", "37")
    x, y = samples(method, range(2, 4))
    method.train()
    penalty = method.training_step(x, y)["ewc"]
    assert penalty.dtype == torch.float32  # also under autocast
    close(penalty, _penalty(37, method.network, f0, theta0))
    assert float(penalty.detach()) > 0
    # the new classes' rows carry no penalty; an old row does
    with torch.no_grad():
        method.network.fc.weight[2:] += 5.0
        method.network.fc.bias[2:] -= 5.0
    close(method.training_step(x, y)["ewc"], penalty)
    with torch.no_grad():
        method.network.fc.weight[:2] += 0.5
    moved = method.training_step(x, y)["ewc"]
    close(moved, _penalty(37, method.network, f0, theta0))
    assert float(moved.detach()) > float(penalty.detach()) + 1


@known_answer("ewc")
@pytest.mark.parametrize("ce_classes", ["new", "seen"])
def test_ewc_step_is_ce_over_the_new_or_the_seen_classes_plus_the_penalty(ce_classes):
    method, f0, theta0 = _ewc_after_one_task("--ce_classes", ce_classes)
    if ce_classes == "new":  # the new data only: CE of z[:, 2:4] against y - 2
        x, y = samples(method, range(2, 4))
        lo = 2
    else:  # every seen class (samples of the old classes too, to tell the ranges apart)
        x, y = samples(method, range(4))
        lo = 0
    method.train()
    losses = method.training_step(x, y)
    z = method.network(x)["logits"]
    assert set(losses) == {"ce", "ewc"} and z.shape[1] == 4
    close(losses["ce"], ce(z, y, lo, 4))
    close(losses["ewc"], _penalty(method.cfg.ewc_lambda, method.network, f0, theta0))
    fresh = build("ewc", "--ce_classes", ce_classes)
    start(fresh, 0)
    x0, y0 = samples(fresh, range(2))
    first = fresh.training_step(x0, y0)
    assert set(first) == {"ce"}  # no penalty in the first task
    close(first["ce"], ce(fresh.network(x0)["logits"], y0, 0, 2))


def test_ewc_restored_from_a_checkpoint_keeps_its_fisher_and_anchor_and_refuses_a_bad_one():
    method, _, _ = _ewc_after_one_task()
    task = method.task
    method.empirical_fisher, _ = _known_fisher(method, seed=8)
    method.after_task(task, None)
    start(method, 2)  # a checkpoint inside task 2: Fisher and anchor padded to the grown head
    state, extra = method.state_dict(), method.extra_state()
    assert state["fisher.fc__weight"].shape == (6, 64) and float(state["fisher.fc__weight"][:4].min()) > 0

    def rebuilt():
        fresh = build("ewc")
        for t in range(3):  # as a resume does: begin_task for every task reached, then the state
            start(fresh, t)
        return fresh

    restored = rebuilt()
    restored.load_checkpoint_state(state, extra, seen=6)
    assert restored.state_dict().keys() == state.keys()
    for name, value in restored.state_dict().items():
        assert torch.equal(value, state[name]), name
    close(restored.penalty(), method.penalty())

    def refused(name, value):
        bad = dict(state)
        if value is None:
            del bad[name]
        else:
            bad[name] = value
        with pytest.raises(InvalidState):
            rebuilt().load_checkpoint_state(bad, extra, seen=6)

    fisher = state["fisher.fc__weight"]
    refused("fisher.fc__weight", torch.full_like(fisher, float("nan")))
    refused("fisher.fc__weight", torch.ones(4, 64))  # the head of another task
    refused("fisher.fc__weight", -fisher)  # a Fisher is a mean of squares
    refused("anchor.fc__bias", None)
    refused("fisher.backbone__conv1__0__weight", state["fisher.backbone__conv1__0__weight"][..., None])
