"""UCIR and PODNet: the cosine classifier, their losses on hand-computed numbers, and what each stage may train."""
import copy
import math
import os

import pytest
import torch

from backbone.cosine_linear import CosineClassifier, CosineIncrementalNet
from backbone.resnet_cifar import ResNet32
from conftest import ROOT, run_stage
from datasets.scenario import DataManager
from methods import build_method, method_config
from trainer.config_loader import load_config
from utils.losses import feature_distillation, margin_ranking_loss, nca_loss, pod_spatial
from utils.registry import UserError
from trainer.engine.engine import Engine
from utils.types import OptimConfig


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
