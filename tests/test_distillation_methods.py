"""iCaRL, WA and BiC: a linear head trained with CE on the seen classes and distilled (KD) from a frozen copy of
the previous network, and what each adds (iCaRL's nearest-mean-of-exemplars prediction, WA's weight aligning and
non-negative head, BiC's bias-correction stage on held-out samples).

Known answers: the losses of a step (CE, KD and their weights) recomputed from the papers' formulas on a fixed
batch with a perturbed student and teacher; the NME scores and class means; WA's aligned rows; BiC's corrected
logits, held-out split and bias stage; and the teacher being a frozen, eval-mode copy (also of UCIR and PODNet).
The formulas are in tests/formulas.py, the builders of a method on the digits fixture in tests/method_builders.py.

To add a method of this family, copy the test of WA (test_wa_weights_ce_and_kd_by_the_share_of_old_classes) and
add the method to the teacher test.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import known_answer, run_stage
from formulas import ce, close, kd, unit
from method_builders import build, build_tiny, perturb, positions, samples, start
from methods.multi_steps.bic import balanced_split
from methods.multi_steps.wa import align_weights
from trainer.engine.engine import Engine
from utils.losses import kd_loss
from utils.types import OptimConfig, Stage


# ---- the parts: KD, WA's weight aligning and clipping, BiC's bias stage and held-out split ----
def test_kd_loss_on_hand_numbers():
    # T = 2 halves both logit rows: targets softmax([0, 0]) = (1/2, 1/2), log-probs log(1/4), log(3/4)
    ln3 = math.log(3.0)
    kd = kd_loss(torch.tensor([[0.0, 2 * ln3]]), torch.tensor([[0.0, 0.0]]), T=2.0)
    assert float(kd) == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-6)
    # against itself KD is the entropy of softmax(z / T) = (1/4, 3/4)
    same = kd_loss(torch.tensor([[0.0, 2 * ln3]]), torch.tensor([[0.0, 2 * ln3]]), T=2.0)
    assert float(same) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)


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
    method, data = build_tiny("wa")
    task = data.tasks[0]
    method.begin_task(task)
    x = torch.stack([data.dataset("train", [i])[0][0] for i in range(4)])
    method.training_step(x, torch.zeros(4, dtype=torch.long))
    assert float(method.network.fc.weight.detach().min()) >= 0.0


def test_bic_bias_stage_trains_only_the_newest_alpha_beta():
    method, data = build_tiny("bic")
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


# ============================================================ iCaRL ===============================================
@known_answer("icarl")
def test_icarl_loss_is_ce_on_seen_classes_plus_kd_on_old_ones():
    method = build("icarl")
    start(method, 0)
    perturb(method.network, seed=1)
    start(method, 1)  # the teacher: a frozen copy of the perturbed network
    perturb(method.network, seed=2)
    x, y = samples(method, range(4))
    method.train()
    losses = method.training_step(x, y)
    z, z_old = method.network(x)["logits"], method.old_network(x)["logits"]
    assert set(losses) == {"ce", "kd"} and z_old.shape[1] == 2
    close(losses["ce"], ce(z, y, 0, 4))
    close(losses["kd"], kd(z[:, :2], z_old, method.cfg.T))


@known_answer("icarl", "finetune_il", "ucir", "podnet")
def test_nme_scores_are_minus_the_distance_of_the_normalised_feature_to_each_class_mean():
    method = build("icarl")
    start(method, 0)
    start(method, 1)
    g = torch.Generator().manual_seed(3)
    method.class_means = unit(torch.randn(4, method.network.feature_dim, generator=g)).float()
    x, _ = samples(method, range(4), per_class=2)
    method.eval()
    with torch.no_grad():
        scores = method.predict(x)
        f = method.network(x)["features"]
    distance = torch.stack([(unit(f) - m).norm(dim=1) for m in method.class_means.double()], 1)
    torch.testing.assert_close(scores["nme"].double(), -distance, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores["nme"].argmax(1), distance.argmin(1))  # the nearest mean wins


@known_answer("icarl")
def test_icarl_class_means_are_normalised_means_of_normalised_exemplar_features():
    method = build("icarl", "--memory_size", "20")
    task = start(method, 0)
    perturb(method.network, seed=1)
    engine = Engine(torch.device("cpu"))
    method.end_task(task, engine.infer)
    assert [len(v) for v in method.memory.exemplars.values()] == [10, 10]
    for c in (0, 1):  # the exemplars' features through the network as inference runs it (in this test's precision)
        f, _ = engine.infer(method.network.features, method.data.dataset("train", method.memory.exemplars[c],
                                                                       augment=False), method)
        torch.testing.assert_close(method.class_means[c].double(), unit(unit(f).mean(0, keepdim=True))[0], atol=1e-5,
                                   rtol=1e-5)


# ============================================================ WA ==================================================
@known_answer("wa")
def test_wa_weights_ce_and_kd_by_the_share_of_old_classes():
    method = build("wa")
    for t in range(2):
        start(method, t)
    perturb(method.network, seed=1)
    start(method, 2)  # known 4, seen 6: lam = 2/3
    perturb(method.network, seed=2)
    x, y = samples(method, range(6))
    method.train()
    losses = method.training_step(x, y)
    z, z_old = method.network(x)["logits"], method.old_network(x)["logits"]
    lam = 4 / 6
    assert set(losses) == {"ce", "kd"}
    close(losses["ce"], (1 - lam) * ce(z, y, 0, 6))
    close(losses["kd"], lam * kd(z[:, :4], z_old, method.cfg.T))


@known_answer("wa")
def test_wa_aligns_the_new_rows_to_the_mean_norm_of_the_old_ones():
    method = build("wa")
    start(method, 0)
    task = start(method, 1)
    with torch.no_grad():
        method.network.fc.weight.copy_(torch.randn(4, 64) + torch.tensor([0.0, 0.0, 2.0, 2.0])[:, None])
        method.network.fc.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    w = method.network.fc.weight.detach().clamp(min=0)
    b = method.network.fc.bias.detach().clone()
    gamma = w[:2].norm(dim=1).mean() / w[2:].norm(dim=1).mean()
    method.memory = None  # nothing to select here
    method.after_task(task, None)
    torch.testing.assert_close(method.network.fc.weight[:2], w[:2])
    torch.testing.assert_close(method.network.fc.weight[2:], gamma * w[2:])
    torch.testing.assert_close(method.network.fc.bias, torch.cat([b[:2], gamma * b[2:]]))
    assert gamma < 1


@known_answer("wa")
def test_wa_head_is_non_negative_in_every_forward_and_after_the_task():
    method = build("wa")
    start(method, 0)
    task = start(method, 1)
    perturb(method.network.fc, seed=4, scale=1.0)
    assert float(method.network.fc.weight.detach().min()) < 0
    seen = []
    method.network.fc.register_forward_pre_hook(lambda m, a: seen.append(float(m.weight.detach().min())))
    subset = method.data.dataset("train", positions(method, range(4), 8))
    opt = OptimConfig(epochs=2, lrate=0.5, batch_size=8)
    Engine(torch.device("cpu")).fit(method, task, Stage("train", lambda: subset, opt, method.training_step))
    assert len(seen) >= 8 and min(seen) >= 0.0
    method.memory = None
    method.after_task(task, None)
    assert float(method.network.fc.weight.detach().min()) >= 0.0


# ============================================================ BiC =================================================
def _bic_at(task_index, **alphas):
    method = build("bic")
    for t in range(task_index):
        start(method, t)
        with torch.no_grad():  # fitted bias layers of the earlier tasks (the teacher holds them too)
            method.network.bias_layers[t].alpha.fill_(1.0 + 0.3 * (t + 1))
            method.network.bias_layers[t].beta.fill_(-0.2 * (t + 1))
    perturb(method.network.backbone, seed=1)
    task = start(method, task_index)
    perturb(method.network.fc, seed=2)
    return method, task


def _corrected(network, x):
    """alpha_t * z + beta_t on every task's slice of the linear head's logits."""
    raw = network.fc(network.backbone(x))
    return torch.cat([layer.alpha * raw[:, 2 * t: 2 * t + 2] + layer.beta
                      for t, layer in enumerate(network.bias_layers)], 1)


@known_answer("bic")
def test_bic_stage_one_weights_ce_and_kd_of_the_bias_corrected_teacher():
    method, _ = _bic_at(2)
    x, y = samples(method, range(6))
    method.train()
    losses = method.training_step(x, y)
    z, z_old = _corrected(method.network, x), _corrected(method.old_network, x)
    lam = 4 / 6
    assert set(losses) == {"ce", "kd"}
    close(losses["ce"], (1 - lam) * ce(z, y, 0, 6))
    close(losses["kd"], lam * kd(z[:, :4], z_old, method.cfg.T))


@known_answer("bic")
def test_bic_bias_stage_is_ce_of_the_corrected_logits():
    method, _ = _bic_at(2)
    with torch.no_grad():
        method.network.bias_layers[2].alpha.fill_(0.7)
        method.network.bias_layers[2].beta.fill_(0.4)
    x, y = samples(method, range(6))
    method.eval()
    losses = method.bias_step(x, y)
    close(losses["bias_ce"], ce(_corrected(method.network, x), y, 0, 6))


@known_answer("bic")
def test_bic_holds_out_train_samples_apart_from_stage_one_balanced_per_class_and_fits_them_full_batch():
    method = build("bic")
    start(method, 0)
    task = start(method, 1)
    method.memory.exemplars = {0: positions(method, [0], 100), 1: positions(method, [1], 100)}
    requested = []
    dataset = method.data.dataset

    def record(split, indices, augment=None):
        requested.append((split, np.asarray(indices).copy()))
        return dataset(split, indices, augment)

    method.data.dataset = record
    new = dataset("train", method.data.indices("train", task.classes))
    train_stage, bias_stage = method.stages(task, new, None)
    train_stage.data(), bias_stage.data()
    (split_train, train_idx), (split_val, val_idx) = requested
    assert split_train == split_val == "train"  # never the test pool
    assert not set(train_idx) & set(val_idx)
    pool = np.concatenate([method.memory.indices(), method.data.indices("train", [2, 3])])
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == sorted(pool.tolist())
    per_class = int(method.cfg.split_ratio * (200 // 2))  # split_ratio of the quota of exemplars per old class
    assert np.bincount(method.data.train_y[val_idx]).tolist() == [per_class] * 4
    opt = bias_stage.optim
    assert (opt.epochs, opt.lrate, opt.batch_size) == (method.cfg.epochs_bias, method.cfg.lrate_bias, len(val_idx))
    assert opt.weight_decay == 0 and train_stage.optim.epochs == method.cfg.epochs


@known_answer("bic")
def test_bic_bias_stage_moves_alpha_and_beta_and_closes_the_old_new_gap():
    method = build("bic")
    start(method, 0)
    task = start(method, 1)
    method.network.backbone = nn.Identity()  # features = the input: a hand-made, new-biased linear classifier
    with torch.no_grad():
        method.network.fc.weight.copy_(torch.eye(4, 64) * 2.0)
        method.network.fc.bias.copy_(torch.tensor([0.0, 0.0, 1.5, 1.5]))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(10)
    x = torch.eye(4, 64)[y] + 0.3 * torch.randn(40, 64, generator=g)
    held_out = torch.utils.data.TensorDataset(x, y)

    def accuracies():
        with torch.no_grad():
            pred = method.network(x)["logits"].argmax(1)
        return [float((pred[y < 2] == y[y < 2]).float().mean()), float((pred[y >= 2] == y[y >= 2]).float().mean())]

    old_before, new_before = accuracies()
    stage = next(s for s in method.stages(task, None, None) if s.name == "bias")
    optim = stage.optim.replace(batch_size=40, epochs=100)  # the stage's own optimiser, to convergence
    Engine(torch.device("cpu")).fit(method, task,
                                    Stage("bias", lambda: held_out, optim, method.bias_step, stage.trains))
    layer = method.network.bias_layers[1]
    old_after, new_after = accuracies()
    assert abs(float(layer.alpha) - 1) > 0.05 and float(layer.beta) < -0.5  # the new logits' bias is taken out
    assert new_before - old_before > 0.5 and abs(new_after - old_after) < 0.5 * (new_before - old_before)
    assert old_after + new_after > old_before + new_before
    assert float(method.network.bias_layers[0].alpha) == 1.0  # the old task's layer is not refitted


# ============================================================ teachers ============================================
@known_answer("icarl", "wa", "bic", "ucir", "podnet")
@pytest.mark.parametrize("name", ["icarl", "wa", "bic", "ucir", "podnet"])
def test_the_teacher_is_a_frozen_copy_that_training_does_not_change(name):
    method = build(name)
    start(method, 0)
    perturb(method.network, seed=1)
    before = {k: v.clone() for k, v in method.network.state_dict().items()}
    task = start(method, 1)
    teacher = method.old_network
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items() if k in before)
    assert not any(p.requires_grad for p in teacher.parameters())
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []
    teacher.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    subset = method.data.dataset("train", positions(method, range(4), 8))
    stage = method.stages(task, subset, None)
    train = next(s for s in stage if isinstance(s, Stage))
    Engine(torch.device("cpu")).fit(method, task, Stage(train.name, lambda: subset, train.optim.replace(epochs=1),
                                                        train.step))
    assert modes and not any(modes)  # eval mode: its BN statistics do not move
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())
    assert not all(torch.equal(v, before[k]) for k, v in method.network.state_dict().items() if k in before
                   and v.shape == before[k].shape)  # while the student learns
