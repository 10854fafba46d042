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
