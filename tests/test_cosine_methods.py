"""UCIR and PODNet: the cosine classifier, their losses on hand-computed numbers, and what each stage may train.

Known answers: UCIR's CE of the scaled cosines, less-forget and margin-ranking losses, and PODNet's NCA, POD-flat
and POD-spatial losses recomputed from the papers' formulas on a fixed batch with a perturbed student and teacher
(the cosine scores with their local-similarity proxies and bounded scale written out in _cosine_scores), and
with `proxy_similarity: distance` (the authors' −‖f̂ − ŵ‖² inside the proxies' softmax, in _distance_scores); the
scale's bound; and the imprinted weights of new classes (UCIR: the normalised mean feature, PODNet: one proxy per
feature cluster). The formulas are in tests/formulas.py, the builders of a method on the digits fixture in
tests/method_builders.py; the teacher and NME tests that also mark UCIR and PODNet are in
tests/test_distillation_methods.py.

To add a method of this family, copy the test of UCIR (test_ucir_losses_ce_less_forget_and_margin_ranking).
"""
import copy
import math
import os

import pytest
import torch

from backbone.cosine_linear import CosineClassifier, CosineIncrementalNet
from backbone.resnet_cifar import ResNet32
from conftest import ROOT, known_answer, run_stage
from datasets.scenario import DataManager
from formulas import ce, close, cosine, logsumexp, unit
from method_builders import build, perturb, samples, start
from methods import build_method, method_config
from trainer.config_loader import load_config
from utils.losses import feature_distillation, margin_ranking_loss, nca_loss, pod_spatial
from utils.registry import UserError
from trainer.engine.engine import Engine
from utils.types import Action, OptimConfig


def test_cosine_classifier_scores_are_sigma_times_cosine():
    head = CosineClassifier(3)
    head.add_classes(2)
    with torch.no_grad():
        head.parts[0].copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        head.log_sigma.fill_(math.log(2.0))
    scores = head(torch.tensor([[3.0, 4.0, 0.0]]))  # cosines 3/5 and 4/5
    assert scores[0].tolist() == pytest.approx([1.2, 1.6])


def test_local_similarity_classifier_weights_proxies_by_softmax():
    head = CosineClassifier(2, nb_proxy=2)
    head.add_classes(1)
    with torch.no_grad():
        head.parts[0].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    cos = torch.tensor([0.6, 0.8])  # the feature (3, 4) against the two proxies
    expected = float((torch.softmax(cos, 0) * cos).sum())
    assert head.cosine(torch.tensor([[3.0, 4.0]])).item() == pytest.approx(expected)


def test_expand_head_freezes_the_parts_of_earlier_tasks():
    head = CosineClassifier(4)
    head.add_classes(2)
    head.add_classes(3)
    assert [p.requires_grad for p in head.parts] == [False, True] and head(torch.randn(5, 4)).shape == (5, 5)


def test_nca_margin_only_on_the_positive():
    z, y = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0])
    assert nca_loss(z, y, 1.0).item() == pytest.approx(math.log(math.e + 1) - (2.0 - 1.0))
    assert nca_loss(z, y, 0.6).item() == 0.0  # hinged: the positive leads by more than the margin
    # the margin is exactly a shift of the positive score; subtracting it from every score would change nothing
    z = 0.1 * torch.randn(6, 5)  # no sample meets the margin: nothing is hinged
    y = torch.randint(0, 5, (6,))
    shifted = z - 0.7 * torch.nn.functional.one_hot(y, 5)
    assert nca_loss(z, y, 0.7).item() == pytest.approx(nca_loss(shifted, y, 0.0).item())
    assert nca_loss(z, y, 0.7).item() > nca_loss(z - 0.7, y, 0.0).item()


def test_margin_ranking_on_old_samples_and_top_k_new_classes():
    cosine = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.2], [0.0, 0.0, 0.9, 0.1, 0.1]])
    y = torch.tensor([0, 2])  # the second sample is of a new class: ignored
    # hard negatives of sample 0: 0.7 and 0.5 -> (0.5 - 0.9 + 0.7) and (0.5 - 0.9 + 0.5)
    assert margin_ranking_loss(cosine, y, n_old=2, k=2, margin=0.5).item() == pytest.approx(0.2)
    assert margin_ranking_loss(cosine, torch.tensor([2, 3]), 2, 2, 0.5).item() == 0.0


def test_pod_losses_vanish_for_identical_features_only():
    maps = [torch.randn(4, 8, 6, 6, requires_grad=True), torch.randn(4, 16, 3, 3)]
    zero = pod_spatial(maps, [m.detach().clone() for m in maps])
    zero.backward()  # the first step of a task compares identical networks: gradients must stay finite
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(maps[0].grad).all()
    assert pod_spatial(maps, [m.detach() + 0.5 * torch.randn_like(m) for m in maps]).item() > 1e-3
    f = torch.randn(4, 10)
    assert feature_distillation(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_distillation(f, torch.randn(4, 10)).item() > 1e-3


def test_hooked_maps_and_unknown_layer_names():
    net = CosineIncrementalNet(ResNet32(last_relu=False), layer_names=["stage_1", "stage_3"])
    net.expand_head(3)
    out = net(torch.randn(2, 3, 16, 16))
    assert [m.shape[1:] for m in out["maps"]] == [(16, 16, 16), (64, 4, 4)]
    assert out["logits"].shape == (2, 3)
    twin = copy.deepcopy(net)  # a copy has its own hooks: both return their maps
    assert len(twin(torch.randn(2, 3, 16, 16))["maps"]) == 2 and len(net(torch.randn(1, 3, 16, 16))["maps"]) == 2
    with pytest.raises(UserError, match="stage_3"):
        CosineIncrementalNet(ResNet32(), layer_names=["stage3"])


def _method(name, **overrides):
    cli = {"device": "cpu", "seed": [1], "img_size": 8, "memory_size": 40, "init_cls": 2, "increment": 2,
           "batch_size": 16, "epochs": 1, "epochs_finetune": 1, **overrides}
    cfg = load_config(os.path.join(ROOT, "options", name, "digits.yaml"), cli, method_config)
    data = DataManager(cfg, seed=1)
    return build_method(cfg, data), data


@pytest.mark.parametrize("name", ["ucir", "podnet"])
def test_stages_train_what_they_should(name):
    method, data = _method(name)
    engine = Engine(torch.device("cpu"))
    first, second = data.tasks[:2]
    method.begin_task(first)
    method.end_task(first, engine.infer)  # memory and class means of task 0 (untrained network: enough here)
    method.begin_task(second)
    snapshot = {k: v.clone() for k, v in method.network.state_dict().items()}
    subset = data.dataset("train", data.indices("train", range(second.total))[::8])  # old and new classes
    losses = run_stage(method, engine, second, "train", subset, data=lambda: subset,
                       optim=OptimConfig(epochs=1, lrate=0.1, batch_size=16))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())
    after = method.network.state_dict()
    assert torch.equal(after["head.parts.0"], snapshot["head.parts.0"])  # old classes frozen
    assert not torch.equal(after["head.parts.1"], snapshot["head.parts.1"])
    assert not torch.equal(after["backbone.conv1.0.weight"], snapshot["backbone.conv1.0.weight"])

    # class-balanced stage: the classifier (old classes included) learns, the feature extractor does not
    snapshot = {k: v.clone() for k, v in method.network.state_dict().items()}
    run_stage(method, engine, second, "balanced", subset)
    after = method.network.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snapshot.items() if k.startswith("backbone."))
    assert not torch.equal(after["head.parts.0"], snapshot["head.parts.0"])
    assert method.network.backbone.conv1[0].weight.requires_grad  # trainable again after the stage


def test_checkpoint_restores_by_replaying_begin_task():
    method, data = _method("podnet")
    for task in data.tasks[:2]:
        method.begin_task(task)
    restored, _ = _method("podnet")
    for task in data.tasks[:2]:
        restored.begin_task(task)
    restored.load_state_dict(method.state_dict())
    x = torch.randn(3, 3, 8, 8)
    method.eval(), restored.eval()
    assert torch.equal(method.predict(x)["cnn"], restored.predict(x)["cnn"])
    assert torch.equal(method.old_network(x)["features"], restored.old_network(x)["features"])


@pytest.mark.parametrize("name, overrides, match", [("ucir", {"memory_size": 0, "apply_nme": False}, "memory_size"),
                                                    ("podnet", {"layer_names": []}, "layer_names")])
def test_settings_the_methods_cannot_run_are_user_errors(name, overrides, match):
    with pytest.raises(UserError, match=match):
        _method(name, **overrides)


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
    perturb(method.network, seed=1, scale=0.05)  # (more makes the teacher's maps ~1e20, whose squares overflow float32)
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
            h = h.double().pow(2)
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
        torch.testing.assert_close(method.network(x)["logits"].double(), sigma * y_hat, atol=1e-4, rtol=1e-5)


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


def _distance_scores(network, x):
    """(σ-free class similarities ŷ, σ) of the authors' form: ŷ_c = Σ_k softmax_k(d_ck) d_ck over the negative
    squared Euclidean distances d_ck = −‖f̂ − ŵ_ck‖² of the unit feature to class c's K unit proxies."""
    f, head = network.backbone(x), network.head
    proxies = unit(torch.cat(list(head.parts)))
    d = -(unit(f)[:, None, :] - proxies[None, :, :]).pow(2).sum(2).view(len(x), -1, head.nb_proxy)
    m = head.max_sigma
    sigma = m / (1 + torch.exp(-(head.log_sigma - math.log(m - 1))))
    return (torch.softmax(d, 2) * d).sum(2), sigma


@known_answer("podnet")
def test_podnet_distance_similarity_weighs_proxies_by_the_softmax_of_negative_squared_distances():
    """proxy_similarity: distance (the authors' code) scores with −‖f̂ − ŵ‖² = 2 cos − 2 inside the local-similarity
    classifier: the logits are σ ŷ of _distance_scores and the NCA loss is taken on them; UCIR keeps the cosine."""
    method = build("podnet", "--nb_proxy", "3", "--proxy_similarity", "distance")
    start(method, 0)
    start(method, 1)
    perturb(method.network, seed=3)
    with torch.no_grad():
        method.network.head.log_sigma.fill_(0.8)
    x, y = samples(method, range(4))
    method.train()
    losses = method.training_step(x, y)
    logits = method.network(x)["logits"]
    y_hat, sigma = _distance_scores(method.network, x)
    z = (sigma * y_hat).detach()
    assert float(y_hat.max()) <= 0.0 and float(y_hat.min()) >= -4.0
    torch.testing.assert_close(logits.double(), z, atol=1e-4, rtol=1e-5)
    delta = method.cfg.nca_margin
    nca = [max(0.0, float(logsumexp(torch.cat([z[i, :y[i]], z[i, y[i] + 1:]])) - (z[i, y[i]] - delta)))
           for i in range(len(y))]
    close(losses["nca"], sum(nca) / len(nca))
    assert method.cfg.proxy_similarity == "distance" and build("ucir").network.head.similarity == "cosine"
