"""Known-answer tests: every loss a method's step returns, and what it predicts, recomputed here from the paper's
formula on a tiny fixed setup (fixed weights, a fixed batch, a fixed teacher), never through the method's own
helpers or utils/losses.py. The network's forward pass (backbone, linear layer) is used as it is; everything on
top of it (class ranges, slices, weights, temperatures, normalisations, signs) is written out below.

The formulas, written once as plain tensor code:
    CE(z, y, [lo, hi))  = mean_i ( -z_{i,y_i} + log sum_{lo_i <= c < hi_i} exp z_{i,c} )
    KD_T(z, z_old)      = -mean_i sum_c softmax(z_old_i / T)_c log softmax(z_i / T)_c
"""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, known_answer
from datasets.scenario import DataManager
from methods import METHODS, build_method, method_config
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config
from utils.registry import UserError
from trainer.engine.engine import Engine
from utils.types import Action, OptimConfig, Stage

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


# ---- the formulas ----
def ce(z, y, lo, hi):
    """CE among the classes [lo_i, hi_i) of each sample (ints: the same range for every sample)."""
    n = len(y)
    lo = [lo] * n if isinstance(lo, int) else list(lo)
    hi = [hi] * n if isinstance(hi, int) else list(hi)
    terms = [-z[i, y[i]].double() + logsumexp(z[i, lo[i]:hi[i]]) for i in range(n)]
    return torch.stack(terms).mean()


def logsumexp(a, dim=0):
    """log sum exp a, shifted by the maximum so that large scores do not overflow."""
    a = a.double()
    m = a.max(dim, keepdim=True).values
    return (m + torch.log(torch.exp(a - m).sum(dim, keepdim=True))).squeeze(dim)


def kd(z, z_old, T):
    def log_softmax(a):
        a = a.double() / T
        return a - logsumexp(a, 1)[:, None]

    return -(log_softmax(z_old).exp() * log_softmax(z)).sum(1).mean()


def unit(a, dim=1):
    return a / a.norm(dim=dim, keepdim=True)


def cosine(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def close(value, expected, tol=1e-5):
    as_float = lambda v: float(v.detach()) if torch.is_tensor(v) else float(v)  # noqa: E731
    assert as_float(value) == pytest.approx(as_float(expected), rel=tol, abs=tol)


def task_bounds(y):
    """[lo, hi) of each label's own task (2 classes per task)."""
    return (y // 2 * 2).tolist(), (y // 2 * 2 + 2).tolist()


# ============================================================ finetune ============================================
@known_answer("finetune_il")
@pytest.mark.parametrize("incre_type", ["cil", "til"])
def test_finetune_ce_over_the_seen_classes_or_the_samples_own_task(incre_type):
    method = build("finetune_il", "--incre_type", incre_type, "--memory_size", "0", "--apply_nme", "false")
    for t in range(3):
        start(method, t)
    perturb(method.network.fc, seed=1)
    x, y = samples(method, range(6))
    method.train()
    losses = method.training_step(x, y)
    z = method.network(x)["logits"]
    assert set(losses) == {"ce"} and z.shape[1] == 6
    lo, hi = (0, 6) if incre_type == "cil" else task_bounds(y)
    close(losses["ce"], ce(z, y, lo, hi))


@known_answer("finetune_normal")
def test_joint_training_is_one_task_with_ce_over_every_class():
    method = build("finetune_normal")
    assert [(t.known, t.total) for t in method.data.tasks] == [(0, 10)]
    start(method, 0)
    perturb(method.network.fc, seed=1)
    x, y = samples(method, range(10), per_class=1)
    method.train()
    losses = method.training_step(x, y)
    close(losses["ce"], ce(method.network(x)["logits"], y, 0, 10))
    with pytest.raises(UserError, match="memory_size"):
        build("finetune_normal", "--memory_size", "20")


@known_answer("finetune_il")
def test_finetune_with_memory_trains_on_the_new_data_plus_the_exemplars():
    method = build("finetune_il")
    start(method, 0)
    task = start(method, 1)
    method.memory.exemplars = {0: positions(method, [0], 4), 1: positions(method, [1], 4)}
    new = method.data.dataset("train", method.data.indices("train", [2, 3]))
    stage, = method.stages(task, new, None)
    train = stage.data()
    labels = [int(train[i][1]) for i in range(len(train))]
    assert len(train) == len(new) + 8 and labels.count(0) == 4 and labels.count(1) == 4


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
    method.class_means = unit(torch.randn(4, method.network.feature_dim, generator=g))
    x, _ = samples(method, range(4), per_class=2)
    method.eval()
    with torch.no_grad():
        scores = method.predict(x)
        f = method.network(x)["features"]
    distance = torch.stack([(unit(f) - m).norm(dim=1) for m in method.class_means], 1)
    torch.testing.assert_close(scores["nme"], -distance, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores["nme"].argmax(1), distance.argmin(1))  # the nearest mean wins


@known_answer("icarl")
def test_icarl_class_means_are_normalised_means_of_normalised_exemplar_features():
    method = build("icarl", "--memory_size", "20")
    task = start(method, 0)
    perturb(method.network, seed=1)
    engine = Engine(torch.device("cpu"), amp=False)  # float32: the means are compared at 1e-5
    method.end_task(task, engine.infer)
    assert [len(v) for v in method.memory.exemplars.values()] == [10, 10]
    method.eval()
    for c in (0, 1):
        idx = method.memory.exemplars[c]
        ds = method.data.dataset("train", idx, augment=False)
        with torch.no_grad():
            f = method.network(torch.stack([ds[i][0] for i in range(len(idx))]))["features"]
        torch.testing.assert_close(method.class_means[c], unit(unit(f).mean(0, keepdim=True))[0], atol=1e-5,
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
    Engine(torch.device("cpu")).fit(method, task, Stage("bias", lambda: held_out, optim, method.bias_step, stage.trains))
    layer = method.network.bias_layers[1]
    old_after, new_after = accuracies()
    assert abs(float(layer.alpha) - 1) > 0.05 and float(layer.beta) < -0.5  # the new logits' bias is taken out
    assert new_before - old_before > 0.5 and abs(new_after - old_after) < 0.5 * (new_before - old_before)
    assert old_after + new_after > old_before + new_before
    assert float(method.network.bias_layers[0].alpha) == 1.0  # the old task's layer is not refitted


# ============================================================ UCIR ================================================
def _cosine_scores(network, x):
    """(features, σ-free class similarities ŷ, σ): ŷ_c = Σ_k softmax_k(s_ck) s_ck over the cosines s_ck of the
    feature to class c's K proxies (plain cosines for K = 1)."""
    f = network.backbone(x)
    head = network.head
    s = unit(f) @ unit(torch.cat(list(head.parts))).T
    k = head.nb_proxy
    s = s.view(len(x), -1, k)
    y_hat = (torch.softmax(s, 2) * s).sum(2)
    m = head.max_sigma
    sigma = head.log_sigma.exp() if m is None else m / (1 + torch.exp(-(head.log_sigma - math.log(m - 1))))
    return f, y_hat, sigma


@known_answer("ucir")
def test_ucir_losses_ce_less_forget_and_margin_ranking():
    method = build("ucir")
    for t in range(2):
        start(method, t)
    perturb(method.network, seed=1)
    start(method, 2)  # known 4, new 2
    perturb(method.network, seed=2)
    with torch.no_grad():
        method.network.head.log_sigma.fill_(0.7)
    x, y = samples(method, range(6))
    method.train()
    losses = method.training_step(x, y)
    f, cos, sigma = _cosine_scores(method.network, x)
    f_old, cos = method.old_network.backbone(x), cos.detach()
    assert set(losses) == {"ce", "less_forget", "margin_ranking"}
    close(losses["ce"], ce(sigma * cos, y, 0, 6))
    lam = method.cfg.lambda_base * math.sqrt(4 / 2)
    close(losses["less_forget"], lam * (1 - cosine(f, f_old)).mean())
    terms = [max(0.0, method.cfg.margin - float(cos[i, y[i]]) + float(hard))
             for i in range(len(y)) if y[i] < 4 for hard in cos[i, 4:].topk(method.cfg.K).values]
    close(losses["margin_ranking"], sum(terms) / len(terms))


class _FixedFeatures:
    """An inference stand-in whose features of a dataset are hand-made: row i belongs to dataset sample i."""

    def __init__(self, features):
        self.features = features

    def __call__(self, fn, dataset, module, batch_size=256, whole=False):
        assert len(dataset) == len(self.features)
        return self.features, torch.as_tensor(dataset.targets)


@known_answer("ucir")
def test_ucir_imprints_new_class_weights_with_the_normalised_mean_of_normalised_features():
    method = build("ucir")
    start(method, 0)
    task = start(method, 1)
    labels = method.data.train_y[method.data.indices("train", task.classes)]
    g = torch.Generator().manual_seed(5)
    features = torch.randn(len(labels), 64, generator=g) * torch.rand(len(labels), 1, generator=g) * 3
    imprint, = [s for s in method.stages(task, None, _FixedFeatures(features)) if isinstance(s, Action)]
    with torch.no_grad():
        imprint.run()
    part = method.network.head.parts[-1]
    for row, c in enumerate(task.classes):
        expected = unit(unit(features[torch.as_tensor(labels == c)]).mean(0, keepdim=True))[0]
        torch.testing.assert_close(unit(part[row:row + 1])[0], expected, atol=1e-5, rtol=1e-5)


# ============================================================ PODNet ==============================================
def _pod_maps(backbone, x, names):
    maps = []
    hooks = [backbone.get_submodule(n).register_forward_hook(lambda m, i, out: maps.append(out)) for n in names]
    try:
        backbone(x)
    finally:
        for h in hooks:
            h.remove()
    return maps


@known_answer("podnet")
def test_podnet_losses_nca_pod_flat_and_pod_spatial():
    method = build("podnet", "--nb_proxy", "3")
    for t in range(2):
        start(method, t)
    perturb(method.network, seed=1)
    start(method, 2)  # seen 6, new 2: factor sqrt(6 / 2)
    perturb(method.network, seed=2)
    with torch.no_grad():
        method.network.head.log_sigma.fill_(1.2)
    x, y = samples(method, range(6))
    method.train()
    losses = method.training_step(x, y)
    f, y_hat, sigma = _cosine_scores(method.network, x)
    z = (sigma * y_hat).detach()
    assert set(losses) == {"nca", "pod_flat", "pod_spatial"}
    delta = method.cfg.nca_margin
    nca = [max(0.0, float(logsumexp(torch.cat([z[i, :y[i]], z[i, y[i] + 1:]])) - (z[i, y[i]] - delta)))
           for i in range(len(y))]
    close(losses["nca"], sum(nca) / len(nca))
    factor = math.sqrt(6 / 2)
    f_old = method.old_network.backbone(x)
    close(losses["pod_flat"], method.cfg.lambda_f_base * factor * (1 - cosine(f, f_old)).mean())
    names = method.cfg.layer_names
    per_layer = []
    for new, old in zip(_pod_maps(method.network.backbone, x, names), _pod_maps(method.old_network.backbone, x, names)):
        def phi(h):  # pooled over the height and over the width, concatenated, L2-normalised
            h = h.pow(2)
            return unit(torch.cat([h.sum(2).flatten(1), h.sum(3).flatten(1)], 1))
        per_layer.append((phi(new) - phi(old)).norm(dim=1).mean())
    close(losses["pod_spatial"], method.cfg.lambda_c_base * factor * torch.stack(per_layer).mean())


@known_answer("podnet")
def test_podnet_scale_starts_at_one_and_stays_below_its_bound():
    method = build("podnet")
    start(method, 0)
    head = method.network.head
    assert float(head.sigma) == pytest.approx(1.0)
    for s in (3.0, 50.0):
        with torch.no_grad():
            head.log_sigma.fill_(s)
        m = method.cfg.max_scale
        assert float(head.sigma) == pytest.approx(m / (1 + math.exp(-(s - math.log(m - 1)))))
        assert float(head.sigma) <= m
    assert float(head.sigma) > 0.99 * method.cfg.max_scale
    x, _ = samples(method, range(2), per_class=2)
    method.eval()
    with torch.no_grad():
        f, y_hat, sigma = _cosine_scores(method.network, x)
        torch.testing.assert_close(method.network(x)["logits"], sigma * y_hat, atol=1e-4, rtol=1e-5)


@known_answer("podnet")
def test_podnet_imprints_the_proxies_of_a_new_class_at_the_centres_of_its_feature_clusters():
    method = build("podnet", "--nb_proxy", "2")
    start(method, 0)
    task = start(method, 1)
    labels = method.data.train_y[method.data.indices("train", task.classes)]
    g = torch.Generator().manual_seed(6)
    centres = unit(torch.randn(4, 64, generator=g))  # two tight clusters per class: 0, 1 for class 2; 2, 3 for 3
    cluster = torch.as_tensor([2 * (c - 2) + (i % 2) for i, c in enumerate(labels)])
    features = (centres[cluster] + 0.01 * torch.randn(len(labels), 64, generator=g)) * 5.0
    imprint, = [s for s in method.stages(task, None, _FixedFeatures(features)) if isinstance(s, Action)]
    with torch.no_grad():
        imprint.run()
    proxies = unit(method.network.head.parts[-1].detach()).view(2, 2, 64)
    for c in range(2):
        means = torch.stack([unit(unit(features[cluster == k]).mean(0, keepdim=True))[0] for k in (2 * c, 2 * c + 1)])
        match = proxies[c] @ means.T  # each proxy is one cluster's normalised mean, each cluster has one proxy
        assert match.max(1).values.min() > 0.9999 and sorted(match.argmax(1).tolist()) == [0, 1]


# ============================================================ DER =================================================
@known_answer("dynamic_er")
def test_der_losses_ce_over_all_extractors_and_aux_ce_with_an_others_class():
    method = build("dynamic_er")
    start(method, 0)
    perturb(method.network, seed=1)
    start(method, 1)
    perturb(method.network, seed=2)
    x, y = samples(method, range(4))
    method.train()
    losses = method.training_step(x, y)
    net = method.network
    features = [b(x) for b in net.backbones]
    assert len(features) == 2 and set(losses) == {"ce", "aux_ce"}
    close(losses["ce"], ce(net.fc(torch.cat(features, 1)), y, 0, 4))
    aux_target = torch.where(y >= 2, y - 2, torch.full_like(y, 2))  # new classes 0..1, any old class: 2
    close(losses["aux_ce"], ce(net.aux_fc(features[1]), aux_target, 0, 3))
    with torch.no_grad():
        method.balanced_fc.weight.normal_()
    balanced = method.balance_step(x, y)
    close(balanced["balanced_ce"], ce(method.balanced_fc(torch.cat(features, 1)) / method.cfg.T, y, 0, 4))


@known_answer("dynamic_er")
def test_der_old_extractor_is_frozen_and_unchanged_by_a_task_and_the_balanced_head_replaces_the_classifier():
    method = build("dynamic_er")
    start(method, 0)
    task = start(method, 1)
    old, new = method.network.backbones
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in (old, new)]
    modes = []
    old.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    subset = method.data.dataset("train", positions(method, range(4), 8))
    stage = next(s for s in method.stages(task, subset, None) if s.name == "train")
    Engine(torch.device("cpu")).fit(method, task, Stage("train", lambda: subset, stage.optim, stage.step))
    assert all(torch.equal(v, before[0][k]) for k, v in old.state_dict().items())  # weights and BN statistics
    assert not all(torch.equal(v, before[1][k]) for k, v in new.state_dict().items())
    assert modes and not any(modes)  # the old extractor runs in eval mode while the new one trains
    with torch.no_grad():
        method.balanced_fc.weight.normal_()
    method.memory = None
    method.after_task(task, None)
    torch.testing.assert_close(method.network.fc.weight, method.balanced_fc.weight)


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
    losses = method.training_step(x, y, pos)
    bx, by = samples(method, [0, 1])  # the buffer samples, in slot order
    assert set(losses) == {"ce", "mse", "buffer_ce"}
    close(losses["ce"], ce(method.network(x)["logits"], y, 0, 10))  # the head covers every class from the start
    close(losses["mse"], method.cfg.alpha * ((method.network(bx)["logits"] - stored) ** 2).mean())
    close(losses["buffer_ce"], method.cfg.beta * ce(method.network(bx)["logits"], by, 0, 10))


@known_answer("dark_er")
def test_der_plus_plus_stores_the_logits_computed_before_the_step():
    method = build("dark_er")
    task = start(method, 0)
    x, y = samples(method, [0, 1], 8)
    pos = torch.as_tensor(positions(method, [0, 1], 8))
    method.train()
    with torch.no_grad():
        before = method.network(x)["logits"]
    batch = torch.utils.data.TensorDataset(x, y, pos)  # (x, y, train-pool position), as train_data yields
    opt = OptimConfig(epochs=1, lrate=0.5, batch_size=16)
    engine = Engine(torch.device("cpu"), amp=False)  # float32: the stored logits are compared at 1e-4
    engine.fit(method, task, Stage("train", lambda: batch, opt, method.training_step))
    assert len(method.memory) == 16
    slot_of = {p: s for s, p in enumerate(method.memory.index[:16].tolist())}
    stored = method.memory.logits[[slot_of[p] for p in pos.tolist()]]
    torch.testing.assert_close(stored, before, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        after = method.network(x)["logits"]
    assert (after - before).abs().max() > 1e-2  # the step moved the network: the stored logits are the old ones


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
        grads = torch.autograd.grad(ce(method.network(mx)["logits"], my, 0, 6).float(), params, allow_unused=True)
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


# ============================================================ ACL / DynaMMo =======================================
def _adapter_method(name, n_tasks, *overrides):
    method = build(name, *overrides)
    for t in range(n_tasks):
        start(method, t)
    perturb(method.network, seed=7, scale=0.05)
    return method


def _routing_by_hand(logits):
    """Min-others routing: p_i = softmax(z_i), u_i = p_i[others]; task t* = argmin u_i; score of class c of task
    i: (1 - u_i) p_i[c] / max_k p_i[k]."""
    probs = [torch.exp(z.double() - logsumexp(z, 1)[:, None]) for z in logits]
    others = torch.stack([p[:, -1] for p in probs], 1)
    scores = torch.cat([(1 - p[:, -1:]) * p[:, :-1] / p[:, :-1].max(1, keepdim=True).values for p in probs], 1)
    return others.argmin(1), scores


@known_answer("acl")
def test_acl_stage_one_is_others_ce_of_the_new_tasks_head_on_its_own_adapters():
    method = _adapter_method("acl", 2)
    x, y = samples(method, range(4))
    method.train()
    losses = method.training_step(x, y)
    z = method.network.heads[1](method.network.forward_paths(x, [1])[0])
    target = torch.where(y >= 2, y - 2, torch.full_like(y, 2))
    close(losses["ce"], ce(z, target, 0, 3))
    heads = method.heads_step(x, y)
    features = method.network.forward_paths(x, [0, 1])
    per_head = [ce(method.network.heads[0](features[0]), torch.where(y < 2, y, torch.full_like(y, 2)), 0, 3),
                ce(method.network.heads[1](features[1]), target, 0, 3)]
    close(heads["heads_ce"], (per_head[0] + per_head[1]) / 2)


@known_answer("acl")
def test_acl_routes_each_sample_to_the_head_least_sure_it_is_another_tasks():
    method = _adapter_method("acl", 3)
    x, _ = samples(method, range(6), per_class=2)
    method.eval()
    with torch.no_grad():
        for head, bias in zip(method.network.heads, ([0.0, 1.0, 2.5], [2.0, 0.0, 0.5], [0.0, 0.0, 3.0])):
            head.weight.mul_(0.2)
            head.bias.copy_(torch.tensor(bias))
        scores = method.predict(x)
        features = method.network.forward_paths(x, [0, 1, 2])
        task_id, expected = _routing_by_hand([h(f) for h, f in zip(method.network.heads, features)])
    assert torch.equal(scores["task_id"], task_id)
    torch.testing.assert_close(scores["cnn"].double(), expected, atol=1e-5, rtol=1e-5)
    picked = expected.argmax(1)
    assert torch.equal(picked // 2, task_id)  # the argmax class lies in the routed task


@known_answer("dynammo")
def test_dynammo_merges_the_task_adapters_into_their_mean_and_predicts_through_it():
    method = _adapter_method("dynammo", 3, "--recalibrate_bn", "false")
    net = method.network
    with torch.no_grad():
        for t, value in enumerate((1.0, 2.0, 6.0)):
            for point in net.adapters:
                for name, tensor in point[t].state_dict().items():
                    if tensor.is_floating_point():
                        tensor.fill_(value * (0.01 if "weight" in name or "alpha" in name else 1.0))
    method.task = method.data.tasks[0]  # as after the first task: no balanced set is needed for the merge
    merge, = [s for s in method.stages(method.task, None, None) if isinstance(s, Action)]
    with torch.no_grad():
        merge.run()
    for point in net.merged:
        for name, tensor in point.state_dict().items():
            if tensor.is_floating_point():
                scale = 0.01 if "weight" in name or "alpha" in name else 1.0
                torch.testing.assert_close(tensor, torch.full_like(tensor, 3.0 * scale))
    method.task = method.data.tasks[2]
    x, _ = samples(method, range(6), per_class=2)
    method.eval()
    with torch.no_grad():
        scores = method.predict(x)
        f = net.forward_paths(x, ["merged"])[0]
        task_id, expected = _routing_by_hand([h(f) for h in net.heads])
    assert torch.equal(scores["task_id"], task_id)
    torch.testing.assert_close(scores["cnn"].double(), expected, atol=1e-5, rtol=1e-5)


# ============================================================ prompt methods ======================================
def _prompt_at(name, task_index, *overrides):
    method = build(name, *VIT, *overrides)
    for t in range(task_index + 1):
        start(method, t)
    perturb(method.network.fc, seed=3)
    return method


def _prefix(prompts):
    """(B, n, 2, L, D) prompts of one block -> (B, 2, n * L, D) prefix keys and values."""
    b, n, two, length, d = prompts.shape
    return prompts.permute(0, 2, 1, 3, 4).reshape(b, two, n * length, d)


@known_answer("l2p")
def test_l2p_picks_the_top_k_keys_by_cosine_masks_other_tasks_and_pulls_the_keys():
    method = _prompt_at("l2p", 1)
    pool, vit = method.pool, method.network.backbone
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2, 3, 2])
    method.train()
    losses = method.training_step(x, y)
    q = vit.query(x)
    cos = unit(q) @ unit(pool.keys).T
    top = cos.topk(method.cfg.top_k, dim=1)
    prefixes = {layer: _prefix(pool.prompts[top.indices][:, :, j]) for j, layer in enumerate(pool.layers)}
    z = method.network.fc(vit(x, prefixes))
    close(losses["ce"], ce(z, y, 2, 4))  # the current task's classes only
    close(losses["pull"], method.cfg.pull_weight * (1 - top.values).sum(1).mean())
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.predict(x)["cnn"], z[:, :4], atol=1e-5, rtol=1e-5)


@known_answer("l2p")
@pytest.mark.parametrize("value, layers", [("true", [0]), ("false", [0, 1, 2, 3, 4])])
def test_l2p_shallow_or_deep_puts_the_prompts_at_the_input_or_in_every_early_block(value, layers):
    method = build("l2p", *VIT, "--shallow_or_deep", value)
    assert method.pool.layers == layers
    with pytest.raises(UserError, match="shallow_or_deep"):
        build("l2p", *VIT, "--shallow_or_deep", value, "--prompt_layers", "1", "2")


@known_answer("dual_prompt")
def test_dual_prompt_trains_the_tasks_e_prompt_with_the_g_prompt_and_routes_by_the_closest_key():
    method = _prompt_at("dual_prompt", 1)
    vit, g, e = method.network.backbone, method.g_prompt, method.e_prompts
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([2, 3, 3, 2])

    def prefixes(task_ids):
        out = {}
        for j, layer in enumerate(g.layers):
            out[layer] = _prefix(g.prompts[torch.zeros_like(task_ids)][:, None, j])
        for j, layer in enumerate(e.layers):
            p = _prefix(e.prompts[task_ids][:, None, j])
            out[layer] = torch.cat([out[layer], p], 2) if layer in out else p
        return out

    method.train()
    losses = method.training_step(x, y)
    q = vit.query(x)
    cos = unit(q) @ unit(e.keys).T
    z = method.network.fc(vit(x, prefixes(torch.ones(4, dtype=torch.long))))
    close(losses["ce"], ce(z, y, 2, 4))
    close(losses["pull"], method.cfg.pull_weight * (1 - cos[:, 1]).mean())
    method.eval()
    with torch.no_grad():
        scores = method.predict(x)
        routed = cos[:, :2].argmax(1)  # among the seen tasks' keys
        torch.testing.assert_close(scores["cnn"], method.network.fc(vit(x, prefixes(routed)))[:, :4], atol=1e-5,
                                   rtol=1e-5)
    assert torch.equal(scores["task_id"], routed)


@known_answer("coda_prompt")
def test_coda_prompt_weights_the_components_by_attended_cosine_and_penalises_non_orthogonality():
    method = _prompt_at("coda_prompt", 1, "--ortho_weight", "0.5")
    vit, comp = method.network.backbone, method.prompt
    with torch.no_grad():  # components away from orthonormal, so the penalty is not zero
        for t in range(comp.n_slices):
            for name in ("key", "attention", "prompt"):
                getattr(comp, f"{name}_{t}").mul_(1.5).add_(0.1)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([3, 2, 2])
    method.train()
    losses = method.training_step(x, y)
    K, A, P = (torch.cat([getattr(comp, f"{n}_{t}") for t in range(comp.n_slices)], 1)
               for n in ("key", "attention", "prompt"))
    q = vit.query(x)
    prefixes = {}
    for j, layer in enumerate(comp.layers):
        attended = q[:, None, :] * A[j][None]  # (B, M, D)
        alpha = (attended * K[j][None]).sum(2) / (attended.norm(dim=2) * K[j].norm(dim=1)[None])
        prefixes[layer] = torch.einsum("bm,mtld->btld", alpha, P[j])
    z = method.network.fc(vit(x, prefixes))
    close(losses["ce"], ce(z, y, 2, 4))
    penalty = 0.0
    for M in (K, A, P.flatten(2)):
        for j in range(len(comp.layers)):
            gram = M[j] @ M[j].T
            penalty = penalty + ((gram - torch.eye(len(gram))) ** 2).mean()
    close(losses["ortho"], 0.5 * penalty, tol=1e-4)


# ============================================================ data manager ========================================
@known_answer("finetune_il")
@pytest.mark.parametrize("shuffle", [True, False])
def test_class_order_follows_the_seed_when_shuffled_and_is_the_identity_otherwise(shuffle):
    from datasets import DATASETS

    cfg = load_config(os.path.join(ROOT, "options", "finetune_il", "digits.yaml"),
                      parse_cli_overrides(["--shuffle", str(shuffle).lower()]), method_config)
    raw = DATASETS.get("digits")().load("data")
    orders = {}
    for seed in (1, 2):
        data = DataManager(cfg, seed=seed)
        expected = np.random.RandomState(seed).permutation(10) if shuffle else np.arange(10)
        assert data.class_order == expected.tolist()
        # labels are remapped to positions in the class order; task t holds the labels [2t, 2t + 2)
        assert np.array_equal(np.asarray(data.class_order)[data.train_y], raw.train_y)
        assert np.array_equal(np.asarray(data.class_order)[data.test_y], raw.test_y)
        assert [(t.known, t.total) for t in data.tasks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
        orders[seed] = data.class_order
    assert (orders[1] != orders[2]) == shuffle
    pinned = load_config(None, {"method": "finetune_il", "dataset": "digits", "backbone": "resnet32",
                                "shuffle": True, "class_order_seed": 7}, method_config)
    assert DataManager(pinned, seed=1).class_order == np.random.RandomState(7).permutation(10).tolist()


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


@known_answer("finetune_il")
def test_tasks_split_the_classes_into_init_cls_then_increment_with_the_remainder_last():
    from datasets.scenario import split_classes

    assert split_classes(10, 2, 2) == [2, 2, 2, 2, 2]
    assert split_classes(10, 4, 3) == [4, 3, 3]
    assert split_classes(10, 3, 4) == [3, 4, 3]
    assert split_classes(10, 5, 10) == [5, 5]
    assert split_classes(10, 10, 2) == [10]
    cfg = load_config(os.path.join(ROOT, "options", "finetune_il", "digits.yaml"),
                      parse_cli_overrides(["--init_cls", "4", "--increment", "3"]), method_config)
    data = DataManager(cfg, seed=1)
    assert [(t.index, t.known, t.total, t.n_tasks) for t in data.tasks] == [(0, 0, 4, 3), (1, 4, 7, 3), (2, 7, 10, 3)]
    test = data.indices("test", [0, 5])
    assert set(data.test_y[test]) == {0, 5} and len(test) == int(np.isin(data.test_y, [0, 5]).sum())


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
    free = float(-(grad @ G[0]) / (G[0] @ G[0] + 1e-3))
    assert 0 < free < 0.5  # with memory strength 0.5 the bound is active, without it is not
    torch.testing.assert_close(applied, grad + max(strength, free) * G[0], atol=1e-4, rtol=1e-4)
