"""SimpleCIL, APER and RanPAC: a frozen pretrained network whose features are classified in closed form (cosine
prototypes; a random projection and ridge regression), the adapters of the first task (APER, RanPAC's Phase 1).

Formulas written out here (float64):
    p_c            = mean_{x in D_c} f(x)                                  (SimpleCIL, APER: f = [f_pre, f_adapted])
    score_c(x)     = <f(x), p_c> / (|f(x)| |p_c|)
    h(x)           = ReLU(f(x) W_rand);  G = sum h h^T;  C = sum h y^T;  W_o = (G + lambda I)^{-1} C;  scores = h W_o
    lambda         = argmin over the grid of the held-out MSE of the classifier fitted on the rest (RanPAC)
    AdaptFormer    : block(x) = x' + mlp(norm2(x')) + s up(ReLU(down(x'))),  x' = x + attn(norm1(x))
"""
import glob
import os

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

import main
from conftest import ROOT, TINY, known_answer
from formulas import ce, close, unit
from method_builders import build, perturb, samples, start
from trainer import checkpoint
from trainer.engine.engine import Engine
from trainer.results import read_results


def features_of(method, classes, adapted=None):
    """Labels and features of the un-augmented training samples of `classes`, through the method's network in
    an inference pass as the method's own (`adapted`: None for `network.features`, else the backbone with or
    without the adapters)."""
    data = method.data
    dataset = data.dataset("train", data.indices("train", classes), augment=False)
    fn = method.network.features if adapted is None else (lambda x: method.network.run(x, adapted))
    f, y = Engine(torch.device("cpu")).infer(fn, dataset, method)
    return y, f.double()


def prototypes(f, y, classes):
    return torch.stack([f[y == c].mean(0) for c in classes])


def cosine_scores(f, p):
    return unit(f) @ unit(p).T


# ============================================================ SimpleCIL ===========================================
@known_answer("simplecil")
def test_simplecil_prototypes_are_class_means_and_scores_their_cosines(precision_mode):
    method = build("simplecil")
    engine = Engine(torch.device("cpu"))
    for index in (0, 1):
        task = start(method, index)
        assert method.stages(task, None, engine.infer) == []  # nothing trains
        method.end_task(task, engine.infer)
    tol = 1e-5 if precision_mode == "float32" else 3e-2
    y, f = features_of(method, range(4))
    expected = prototypes(f, y, range(4))
    torch.testing.assert_close(method.network.head.weight.double(), expected, rtol=tol, atol=tol)
    x, _ = samples(method, range(4), per_class=2)
    method.eval()
    with torch.no_grad():
        scores = method.predict(x)["cnn"]
        fx = method.network.features(x).double()
    assert scores.dtype == torch.float32 and scores.shape == (8, 4)
    torch.testing.assert_close(scores.double(), cosine_scores(fx, method.network.head.weight.double()),
                               rtol=1e-5, atol=1e-5)


def test_simplecil_accuracy_is_nearest_cosine_prototype_on_the_frozen_pretrained_features(tmp_path):
    """Through main.py, on the real ImageNet-pretrained efficientnet_lite0 (float32): the accuracy it reports equals,
    to 0.01 points, nearest-cosine-prototype classification computed here from the features of a separately built
    network with the same weights (the framework's input pipeline: inputs are resized and normalised by batch)."""
    from backbone import build_backbone
    from datasets.scenario import DataManager
    from methods import method_config
    from trainer.cli import parse_overrides
    from trainer.config_loader import load_config

    args = ["--config", os.path.join(ROOT, "options", "simplecil", "digits_imagenet.yaml"), *TINY,
            "--img_size", "32", "--amp", "false", "--save_models", "false"]
    run_dir = main.main([*args, "--log_root", str(tmp_path)])
    run = read_results(run_dir)["runs"][0]
    cfg = load_config(args[1], parse_overrides(args[2:]), method_config)
    data = DataManager(cfg, seed=1)
    net = build_backbone("efficientnet_lite0", pretrained=True).eval()

    def feats(split, classes):  # the framework's input pipeline, a separately built network
        dataset = data.dataset(split, data.indices(split, classes), augment=False)
        f, y = Engine(torch.device("cpu"), amp=False).infer(net, dataset, net)
        return f.double(), y

    f_train, y_train = feats("train", range(10))
    p = prototypes(f_train, y_train, range(10))
    for task, recorded in zip(data.tasks, run["tasks"]):
        f_test, y_test = feats("test", range(task.total))
        predicted = cosine_scores(f_test, p[: task.total]).argmax(1)
        accuracy = 100 * float((predicted == y_test).double().mean())
        assert recorded["acc"] == pytest.approx(accuracy, abs=0.01)
    assert all(t["train_time_s"] > 0 for t in run["tasks"])  # the feature pass is its training time
    first, last = run["tasks"]
    assert last["params"] - first["params"] == 5 * 1280  # the prototypes of the 5 new classes count
    assert last["gflops"] > first["gflops"]  # the cosines against them too


# ============================================================ APER ================================================
@known_answer("aper")
def test_aper_trains_adapters_on_the_first_task_then_classifies_by_prototypes_of_both_features(precision_mode):
    method = build("aper")
    engine = Engine(torch.device("cpu"))
    task = start(method, 0)
    network = method.network
    (stage,) = method.stages(task, None, engine.infer)
    perturb(network.adapters, seed=1, scale=0.1)
    x, y = samples(method, range(2))
    method.train()
    loss = stage.step(x, y)["ce"]
    head = network.fc
    z = head.sigma * cosine_scores(network.run(x, True), torch.cat(list(head.parts)))
    close(loss, ce(z, y, 0, 2), tol=1e-4 if precision_mode == "float32" else 2e-2)
    # the trainable set: the adapters and the training head only
    assert set(map(id, stage.trains())) == {id(network.adapters), id(network.fc)}
    method.end_task(task, engine.infer)
    task = start(method, 1)
    assert method.stages(task, None, engine.infer) == []  # later tasks train nothing
    method.end_task(task, engine.infer)
    yy, plain = features_of(method, range(4), adapted=False)
    _, adapted = features_of(method, range(4), adapted=True)
    torch.testing.assert_close(plain, features_of_backbone(method, range(4)))  # the backbone without any adapter
    assert not torch.allclose(plain, adapted)
    tol = 1e-5 if precision_mode == "float32" else 3e-2
    expected = prototypes(torch.cat([plain, adapted], 1), yy, range(4))
    torch.testing.assert_close(network.head.weight.double(), expected, rtol=tol, atol=tol)
    xs, _ = samples(method, range(4), per_class=2)
    method.eval()
    with torch.no_grad():
        scores = method.predict(xs)["cnn"].double()
        both = torch.cat([network.run(xs, False), network.run(xs, True)], 1).double()
    torch.testing.assert_close(scores, cosine_scores(both, network.head.weight.double()), rtol=1e-5, atol=1e-5)


def features_of_backbone(method, classes):
    """The backbone's own forward (no hook can add an adapter outside `run(x, True)`)."""
    dataset = method.data.dataset("train", method.data.indices("train", classes), augment=False)
    return Engine(torch.device("cpu")).infer(method.network.backbone, dataset, method)[0].double()


def test_adaptformer_block_adds_the_scaled_bottleneck_of_the_post_attention_stream_beside_the_mlp():
    from backbone import build_backbone
    from backbone.adapted import AdaptedNet, CosinePrototypes

    torch.manual_seed(0)
    net = AdaptedNet(build_backbone("vit_tiny_patch16_224"), CosinePrototypes, "both", ["blocks"], img_size=32,
                     bottleneck=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.run(x, True), net.run(x, False))  # `up` starts at zero
        perturb(net.adapters, seed=1)
        wrapped = net.backbone.blocks[0]
        block, adapter = wrapped.block, wrapped.adapter
        tokens = torch.randn(2, 5, 192)
        post = tokens + block.attn(block.norm1(tokens))
        bottleneck = torch.relu(post @ adapter.down.weight.T + adapter.down.bias)
        expected = post + block.mlp(block.norm2(post)) + 0.1 * (bottleneck @ adapter.up.weight.T + adapter.up.bias)
        net._set_adapting(True)
        torch.testing.assert_close(wrapped(tokens), expected)
        net._set_adapting(False)
        torch.testing.assert_close(wrapped(tokens), post + block.mlp(block.norm2(post)))
        assert not torch.allclose(net.run(x, True), net.run(x, False))
        assert net.features(x).shape == (2, 2 * 192)


@pytest.mark.parametrize("use, layer_names", [("pretrained", []), ("adapted", ["blocks"])])
def test_a_timm_vit_takes_the_run_image_size_with_or_without_adapters(use, layer_names):
    """SimpleCIL's and RanPAC's network on a timm ViT at 16 px (one patch): the ViT is resized for the run, whether
    or not adapters go into its blocks."""
    from backbone import build_backbone
    from backbone.adapted import AdaptedNet, RandomProjectionRidge

    net = AdaptedNet(build_backbone("vit_tiny_patch16_224"), lambda width: RandomProjectionRidge(width, 50), use,
                     layer_names, img_size=16).eval()
    net.expand_head(3)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 16, 16))["logits"].shape == (2, 3)
    assert len(net.adapters) == (12 if layer_names else 0)


# ============================================================ RanPAC ==============================================
@known_answer("ranpac")
def test_ranpac_accumulates_gram_and_class_sums_and_solves_the_ridge_chosen_on_held_out_samples():
    method = build("ranpac", "--rp_dim", "300", "--first_session", "false")
    engine = Engine(torch.device("cpu"))
    head = method.network.head
    hs, ys = [], []
    for index in (0, 1):
        task = start(method, index)
        assert method.stages(task, None, engine.infer) == []
        method.end_task(task, engine.infer)
        y, f = features_of(method, task.classes)
        h = torch.relu(f @ head.projection.double())
        hs.append(h)
        ys.append(torch.nn.functional.one_hot(y, 4).double())
        labels = y.numpy()  # the held-out part, drawn as documented: stratified, random_state = 1000 seed + task
        fit, held = train_test_split(range(len(labels)), test_size=0.2, stratify=labels,
                                     random_state=1000 * 1 + index)
        yt = ys[-1][:, : task.total]
        errors = []
        for r in method.cfg.ridge_grid:
            w = torch.linalg.inv(h[fit].T @ h[fit] + r * torch.eye(300, dtype=torch.float64)) @ (h[fit].T @ yt[fit])
            errors.append(float(((h[held] @ w - yt[held]) ** 2).mean()))
        assert method.ridges[index] == method.cfg.ridge_grid[int(np.argmin(errors))]
    h, y = torch.cat(hs), torch.cat(ys)
    torch.testing.assert_close(method.gram, h.T @ h, rtol=1e-9, atol=1e-9)  # summed over both tasks, float64
    torch.testing.assert_close(method.class_sums, h.T @ y, rtol=1e-9, atol=1e-9)
    lam = method.ridges[1]
    w_o = torch.linalg.inv(h.T @ h + lam * torch.eye(300, dtype=torch.float64)) @ (h.T @ y)
    torch.testing.assert_close(head.weight.double(), w_o.T, rtol=1e-3, atol=1e-5)
    x, _ = samples(method, range(4), per_class=2)
    method.eval()
    with torch.no_grad():
        scores = method.predict(x)["cnn"].double()
        hx = torch.relu(method.network.features(x).double() @ head.projection.double())
    torch.testing.assert_close(scores, hx @ head.weight.double().T, rtol=1e-5, atol=1e-4)


def test_ranpac_with_phase_one_classifies_the_adapted_features_and_counts_the_projection():
    method = build("ranpac", "--rp_dim", "300")
    assert method.network.use == "adapted" and len(method.network.adapters) == 3
    task = start(method, 0)
    assert [s.name for s in method.stages(task, None, None)] == ["adapt"]
    task = start(method, 1)
    assert method.stages(task, None, None) == []
    from trainer.flops import inference_cost

    _, params = inference_cost(method, 8, torch.device("cpu"))
    backbone = sum(p.numel() for p in method.network.backbone.parameters())
    adapters = sum(p.numel() for p in method.network.adapters.parameters())
    assert params == backbone + adapters + 64 * 300 + 4 * 300  # W_rand and W_o are part of prediction


def test_ranpac_refuses_a_checkpoint_with_a_ridge_outside_its_grid():
    from utils.registry import InvalidState

    method = build("ranpac", "--rp_dim", "50", "--first_session", "false")
    start(method, 0)
    extra = method.extra_state()
    extra["ridges"] = [3.0]
    with pytest.raises(InvalidState):
        method.load_checkpoint_state(method.state_dict(), extra, 2)


# ============================================================ resume and re-test ==================================
# (the five methods of one stage or none: tests/test_resume.py stops multi-stage methods inside each stage)
class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["simplecil", "aper", "ranpac", "lwf", "ewc"])
def test_killed_after_a_task_resumes_to_the_same_numbers_and_retests_to_them(method, tmp_path, monkeypatch):
    args = ["--config", os.path.join(ROOT, "options", method, "digits.yaml"), *TINY, "--img_size", "8",
            "--save_models", "true", "--note", "run", "--device", "cpu"]
    whole = read_results(main.main([*args, "--log_root", str(tmp_path / "whole")]))["runs"][0]
    save = checkpoint.save

    def save_then_stop(path, state):
        save(path, state)
        if state["position"]["task"] == 0 and state["position"]["done"]:
            raise _Stop

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(_Stop):
        main.main([*args, "--log_root", str(tmp_path / "stopped")])
    monkeypatch.undo()
    (stopped,) = glob.glob(str(tmp_path / "stopped" / "**" / "run"), recursive=True)
    run_dir = main.main(["--checkpoint_dir", stopped, "--device", "cpu"])
    resumed = read_results(run_dir)["runs"][0]
    assert resumed["complete"] and resumed["acc_matrix"] == whole["acc_matrix"]
    main.main(["--checkpoint_dir", run_dir, "--device", "cpu"])
    retested = read_results(run_dir, "results_retest")["runs"][0]
    assert retested["acc_matrix"] == whole["acc_matrix"]
