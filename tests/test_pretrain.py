"""contrastive_pretrain (MoCo v2, SimSiam): the losses from their formulas, the loss falling, the features beating a
random backbone under a linear probe, and the written file loading into every method (and not into another
architecture)."""
import copy
import glob
import itertools
import math
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from backbone import build_backbone
from backbone.resnet_cifar import ResNet32
from conftest import ROOT, known_answer
from datasets.scenario import DataManager
from methods import METHODS, build_method, method_config
from trainer.results import read_results
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config
from utils.losses import info_nce, simsiam_loss
from utils.registry import UserError
from trainer.seed import set_seed
from trainer.engine.engine import Engine


# ---- the losses, recomputed from the papers' formulas ----
@known_answer("contrastive_pretrain")
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


@known_answer("contrastive_pretrain")
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
    method.begin_task(data.tasks[0])
    return method, data


class LossLog:
    def __init__(self):
        self.losses = []

    def after_epoch(self, end):
        self.losses.append(sum(end.losses.values()))


def in_batch_info_nce(network, x1, x2, T):
    """InfoNCE of the queries of x1 against the keys of x2, each other image's key a negative, written out:
    -mean_i log softmax_j(q_i . k_j / T)_i, on a copy of the network (its BN statistics untouched)."""
    import copy

    net = copy.deepcopy(network).train()
    with torch.no_grad():
        q, k = net.query(x1), net.keys(x2, 1)
        return float(F.cross_entropy(q @ k.T / T, torch.arange(len(q))))


@pytest.mark.parametrize("mode", ["moco_v2", "simsiam"])
def test_the_loss_falls(mode):
    """Eight epochs on 128 images. SimSiam: the mean loss of the last two epochs is clearly below that of the first
    two. MoCo's training loss is not comparable across epochs (its negatives come from the queue, which fills with
    ever harder keys), so its InfoNCE against fixed negatives (the other images of a fixed batch) must fall.
    MoCo's views differ by a crop of 0.9-1 of the area only: from a random network, whose outputs all point into a
    narrow cone, InfoNCE with the full digits augmentation needs far more steps than a unit test has."""
    import dataclasses

    extra = ["--crop_scale", "0.9", "1", "--jitter_p", "0", "--lrate", "0.03", "--shuffle_bn_splits", "2"] if mode == "moco_v2" else ["--lrate", "0.1"]
    method, data = make("contrastive_pretrain", "--mode", mode, "--K", "32", "--m", "0.9", "--proj_dim", "64",
                        "--pred_dim", "16", *extra)
    engine, log = Engine(torch.device("cpu")), LossLog()
    engine.register(log)
    task = data.tasks[0]
    stage = method.stages(task, None, engine.infer)[0]
    views = method.two_view_data(task)
    held = [views[(i, i)] for i in range(128, 192)]  # fixed draws of 64 images the training never sees
    x1, x2 = torch.stack([v[0] for v in held]), torch.stack([v[1] for v in held])
    before = in_batch_info_nce(method.network, x1, x2, 0.2) if mode == "moco_v2" else None
    small = torch.utils.data.Subset(views, np.arange(128))
    engine.fit(method, task, dataclasses.replace(stage, data=lambda: small,
                                                  optim=stage.optim.replace(epochs=8, batch_size=16)))
    assert len(log.losses) == 8
    if mode == "simsiam":
        assert np.mean(log.losses[-2:]) < np.mean(log.losses[:2]) - 0.1, log.losses
    else:
        after = in_batch_info_nce(method.network, x1, x2, 0.2)
        assert after < before - 0.1, (before, after)
        assert int(method.network.queue_ptr) == (8 * 8 * 16) % 32


def probe_accuracy(backbone, data, augmented_test):
    """Logistic regression on the standardised features of the un-augmented training images, scored on the test
    images seen through `augmented_test` (a transform), after the BN statistics of `backbone` are re-estimated on
    the training images (what contrastive_pretrain does before writing its file, done to both backbones)."""
    from sklearn.linear_model import LogisticRegression

    from backbone.adapters import bn_recalibration

    engine = Engine(torch.device("cpu"))
    train = data.dataset("train", np.arange(len(data.train_y)), augment=False)
    with bn_recalibration(backbone):
        engine.infer(lambda x: backbone.train()(x), train, backbone)
    backbone.eval()
    x_train, y_train = engine.infer(backbone, train, backbone)
    pool = data.pool("test")
    test = [(augmented_test(pool.image(i)), int(y)) for i, y in enumerate(pool.targets)]
    x_test, y_test = engine.infer(backbone, test, backbone)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    probe = LogisticRegression(max_iter=2000).fit(((x_train - mu) / sd).numpy(), y_train.numpy())
    return 100 * probe.score(((x_test - mu) / sd).numpy(), y_test.numpy())


def test_a_linear_probe_on_the_pretrained_features_beats_a_random_backbone():
    """SimSiam for a few epochs on 512 images against the same, untrained resnet32. The probe is scored on test
    images under the pretraining augmentation: on clean 8-px digits a random resnet32 already reaches ~90% (raw
    pixels 96%), as much as minutes of self-supervision give, whereas features learnt to be invariant to crops
    and contrast classify the augmented digits far better (random ~23-29%, 100 epochs of SimSiam ~66%; these 6
    epochs gave 31-40% over three data orders and two learning rates, hence the margin of 5 points)."""
    import dataclasses

    method, data = make("simsiam", "--lrate", "0.05", "--batch_size", "32")
    torch.manual_seed(0)
    random_backbone = build_backbone("resnet32")
    engine = Engine(torch.device("cpu"))
    task = data.tasks[0]
    stage = method.stages(task, None, engine.infer)[0]
    subset = torch.utils.data.Subset(method.two_view_data(task), np.arange(512))
    engine.fit(method, task, dataclasses.replace(stage, data=lambda: subset, optim=stage.optim.replace(epochs=6)))
    torch.manual_seed(1)
    pretrained = probe_accuracy(method.network.backbone, data, method.augmentation())
    torch.manual_seed(1)
    random = probe_accuracy(random_backbone, data, method.augmentation())
    assert pretrained > random + 5, (pretrained, random)


# ---- the written file ----
@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    """A one-epoch run of options/contrastive_pretrain/digits.yaml through main.py, written to save_path too."""
    import main

    tmp = tmp_path_factory.mktemp("pretrain")
    run_dir = main.main(["--config", os.path.join(ROOT, "options", "contrastive_pretrain", "digits.yaml"),
                         "--device", "cpu", "--seed", "1", "--epochs", "1",
                         "--save_path", str(tmp / "out" / "{mode}_{dataset}_{backbone}_s{seed}.pth"),
                         "--log_root", str(tmp / "logs")])
    return read_results(run_dir), run_dir, str(tmp / "out" / "moco_v2_digits_resnet32_s1.pth")


def test_the_run_writes_the_backbone_and_reports_a_feature_accuracy(pretrained_file):
    results, run_dir, path = pretrained_file
    (task,) = results["runs"][0]["tasks"]
    assert 20.0 < task["acc"] <= 100.0  # nearest class mean over 10 classes: far above chance after one epoch
    in_run = os.path.join(run_dir, "backbone_seed1.pth")
    state, copy = torch.load(path, weights_only=True), torch.load(in_run, weights_only=True)
    assert state["backbone"] == "resnet32" and state["mode"] == "moco_v2" and state["img_size"] == 8
    assert set(state["state_dict"]) == set(ResNet32().state_dict())
    assert all(torch.equal(v, copy["state_dict"][k]) for k, v in state["state_dict"].items())
    assert not glob.glob(os.path.join(os.path.dirname(path), "*.tmp"))


def methods_on_resnet32():
    """Every method whose digits config uses a resnet32 (or its cosine variant) backbone."""
    names = []
    for name in METHODS.keys():
        if METHODS.meta(name)["method_type"] == "pretrain":
            continue
        cfg = load_config(os.path.join(ROOT, "options", name, "digits.yaml"), {}, method_config)
        if cfg.backbone in ("resnet32", "cosine_resnet32"):
            names.append(name)
    return names


@pytest.mark.parametrize("name", methods_on_resnet32())
def test_the_file_loads_into_every_method(name, pretrained_file):
    path = pretrained_file[2]
    expected = torch.load(path, weights_only=True)["state_dict"]
    argv = ["--device", "cpu", "--img_size", "8", "--pretrained", "true", "--pretrain_path", path]
    cfg = load_config(os.path.join(ROOT, "options", name, "digits.yaml"), parse_cli_overrides(argv), method_config)
    data = DataManager(cfg, seed=1, single_task=METHODS.meta(name)["method_type"] == "single_step")
    method = build_method(cfg, data)
    method.begin_task(data.tasks[0])  # DER builds its first branch here
    backbones = [m for m in method.modules() if isinstance(m, ResNet32)]
    assert backbones, name
    for backbone in backbones:
        state = backbone.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items()), name


def test_a_file_of_another_architecture_is_a_one_line_error(pretrained_file):
    with pytest.raises(UserError) as err:
        build_backbone("resnet18_cifar", pretrained=True, pretrain_path=pretrained_file[2])
    assert "\n" not in str(err.value) and pretrained_file[2] in str(err.value)


def test_the_originals_pretrain_configs_load_unchanged():
    for path in sorted(glob.glob(os.path.join(ROOT, "options", "pretrain", "*", "*.yaml"))):
        cfg = load_config(path, {}, method_config)
        assert cfg.method == "contrastive_pretrain" and cfg.method_type == "pretrain"
        assert cfg.mode == os.path.basename(os.path.dirname(path))
    cfg = load_config(os.path.join(ROOT, "options", "pretrain", "moco_v2", "cifar100.yaml"), {}, method_config)
    assert (cfg.m, cfg.T, cfg.K) == (0.99, 0.07, 2048)


def test_several_seeds_need_a_seed_in_save_path():
    with pytest.raises(UserError, match="seed"):
        make("contrastive_pretrain", "--seed", "1", "2", "--save_path", "out.pth")


# ---- one MoCo v2 step, recomputed by hand ----
def _moco(K=8, m=0.75, T=0.2):
    """MoCo v2 on a resnet32 at 8 px with a queue of K keys, its query encoder moved away from the key encoder
    (a copy of it at the start, so that the momentum update has something to do), and fixed, distinct views."""
    from method_builders import perturb

    method, data = make("contrastive_pretrain", "--K", str(K), "--m", str(m), "--T", str(T), "--proj_dim", "4",
                        "--shuffle_bn_splits", "1")
    net = method.network
    perturb(net.backbone, seed=3, scale=0.05)
    perturb(net.head, seed=4, scale=0.05)
    views = method.two_view_data(data.tasks[0])
    held = [views[(i, 100 + i)] for i in range(4)]
    x1, x2 = torch.stack([v[0] for v in held]), torch.stack([v[1] for v in held])
    assert (x1 - x2).abs().max() > 0.5  # two different views
    return method, net, x1, x2, torch.as_tensor([v[2] for v in held])


def _encode(backbone, head, x):
    """An encoder's L2-normalised output on x in train mode (batch statistics), on copies (nothing moves)."""
    backbone, head = copy.deepcopy(backbone).train(), copy.deepcopy(head).train()
    with torch.no_grad():
        z = head(backbone(x)).double()
    return z / z.norm(dim=1, keepdim=True)


def _info_nce_by_hand(q, k, queue, T):
    """-mean_i log( exp(q_i.k_i/T) / (exp(q_i.k_i/T) + sum_j exp(q_i.n_j/T)) ), in float64."""
    positive = (q * k).sum(1) / T
    negatives = q @ queue.double().T / T
    return float((-positive + torch.logsumexp(torch.cat([positive[:, None], negatives], 1), 1)).mean())


@known_answer("contrastive_pretrain")
def test_a_moco_step_updates_the_key_encoder_then_scores_against_the_old_queue_then_enqueues():
    """MoCo v2's step, by hand: (1) theta_k <- m theta_k + (1 - m) theta_q, once; (2) q from view 1 through the
    query encoder, k from view 2 through the updated key encoder; (3) InfoNCE at temperature T against the queue as
    it was before the step; (4) the keys replace the oldest len(batch) entries (wrapping around modulo K) and
    queue_ptr moves by the batch size. The queue pointer starts at K - 2, so the four keys wrap around."""
    m, T, K = 0.75, 0.2, 8
    method, net, x1, x2, y = _moco(K, m, T)
    queue = F.normalize(torch.randn(K, 4, generator=torch.Generator().manual_seed(5)), dim=1)
    net.queue.copy_(queue)
    net.queue_ptr.fill_(K - 2)
    query = dict(net.backbone.named_parameters(), **{f"head.{n}": p for n, p in net.head.named_parameters()})
    key = dict(net.key_backbone.named_parameters(), **{f"head.{n}": p for n, p in net.key_head.named_parameters()})
    assert set(query) == set(key) and any(not torch.equal(query[n], key[n]) for n in query)
    moved = {n: m * key[n].detach().double() + (1 - m) * query[n].detach().double() for n in key}

    key_backbone, key_head = copy.deepcopy(net.key_backbone), copy.deepcopy(net.key_head)
    with torch.no_grad():
        for n, p in itertools.chain(key_backbone.named_parameters(),
                                    ((f"head.{n}", p) for n, p in key_head.named_parameters())):
            p.copy_(moved[n])
    q = _encode(net.backbone, net.head, x1)
    k = _encode(key_backbone, key_head, x2)
    expected = _info_nce_by_hand(q, k, queue, T)
    # what the faults would give instead: each is far from the right answer
    enqueued_first = queue.double().clone()
    enqueued_first[[6, 7, 0, 1]] = k
    wrong = {"queue after enqueueing": _info_nce_by_hand(q, k, enqueued_first, T),
             "keys of view 1": _info_nce_by_hand(q, _encode(key_backbone, key_head, x1), queue, T),
             "T = 1": _info_nce_by_hand(q, k, queue, 1.0),
             "keys before the momentum update": _info_nce_by_hand(q, _encode(net.key_backbone, net.key_head, x2),
                                                                  queue, T)}
    assert all(abs(v - expected) > 1e-3 for v in wrong.values()), (expected, wrong)

    method.train()
    losses = method.training_step(x1, x2, y)
    assert set(losses) == {"info_nce"}
    assert float(losses["info_nce"]) == pytest.approx(expected, rel=1e-5, abs=1e-5), (expected, wrong)
    for n, p in key.items():  # one momentum update, not two, not none
        torch.testing.assert_close(p.double(), moved[n], rtol=0, atol=1e-6, msg=n)
    torch.testing.assert_close(net.queue[[6, 7, 0, 1]].double(), k, rtol=0, atol=1e-5)  # the newest keys, in order
    assert torch.equal(net.queue[2:6], queue[2:6])  # the rest untouched
    assert int(net.queue_ptr) == 2  # (K - 2 + 4) mod K
    losses["info_nce"].backward()  # the loss reaches the query encoder only
    assert all(p.grad is not None for p in net.backbone.parameters())
    assert all(p.grad is None for p in itertools.chain(net.key_backbone.parameters(), net.key_head.parameters()))


def test_the_moco_queue_advances_by_each_batch_through_the_training_loop():
    """Three steps of batch 4 through the engine on a queue of K = 6 keys: the pointer goes 0 -> 4 -> 2 -> 0 and
    every entry of the queue is one of the last keys (L2-normalised), none of the initial random ones left."""
    import dataclasses

    method, _, _, _, _ = _moco(K=6)
    net = method.network
    initial = net.queue.clone()
    pointers = []
    step = method.training_step

    def recording(x1, x2, y):
        out = step(x1, x2, y)
        pointers.append(int(net.queue_ptr))
        return out

    task = method.data.tasks[0]
    stage = method.stages(task, None, None)[0]
    subset = torch.utils.data.Subset(method.two_view_data(task), np.arange(12))
    Engine(torch.device("cpu"), amp=False).fit(method, task, dataclasses.replace(
        stage, data=lambda: subset, step=recording, optim=stage.optim.replace(epochs=1, batch_size=4)))
    assert pointers == [4, 2, 0]
    torch.testing.assert_close(net.queue.norm(dim=1), torch.ones(6))
    assert torch.cdist(net.queue, initial).min() > 1e-3  # every initial entry replaced


# ---- BN re-estimation ----
class _TwoNorms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn1d = torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3, momentum=0.3), \
            torch.nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn1d(self.bn(self.conv(x)).mean((2, 3)))


def _batch_stats(x, dims):
    """Per channel: the batch mean and the unbiased batch variance (what BN averages into its running ones)."""
    x = x.double()
    mean = x.mean(dims)
    n = x.numel() // x.shape[1]
    var = ((x - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims) / (n - 1)
    return mean, var


def batch_statistics(module, batches):
    """{BN layer name: [(mean, unbiased variance) of its input over each batch]} of a copy of `module` run in train
    mode on `batches` (BN normalises by the batch's own statistics there, so its running ones change nothing)."""
    module = copy.deepcopy(module).train()
    stats = {}

    def record(name):
        def hook(bn, args, out):
            stats.setdefault(name, []).append(_batch_stats(args[0], (0, 2, 3) if args[0].dim() == 4 else (0,)))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in module.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for x in batches:
            module(x)
    for h in hooks:
        h.remove()
    return stats


def assert_plain_average(norms, stats, tol=1e-5):
    """Each BN layer's running mean and variance are the unweighted mean over the batches of its batch statistics."""
    assert set(stats) == set(norms)  # every layer was seen by the pass by hand
    for name, bn in norms.items():
        means, variances = zip(*stats[name])
        torch.testing.assert_close(bn.running_mean.double(), sum(means) / len(means), rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(bn.running_var.double(), sum(variances) / len(variances), rtol=tol, atol=tol,
                                   msg=name)
        assert int(bn.num_batches_tracked) == len(means), name


def test_bn_recalibration_resets_and_averages_the_batches_then_restores_the_momentum():
    """Inside the block: the old running statistics are gone and the new ones are the plain (unweighted) average of
    the batches' statistics (momentum None), whatever the batch sizes; afterwards the momenta are as before, also
    when the block raises."""
    from backbone.adapters import bn_recalibration

    torch.manual_seed(0)
    net = _TwoNorms()
    for bn in (net.bn, net.bn1d):  # as after training: statistics far from the data's, many batches counted
        bn.running_mean.fill_(50.0)
        bn.running_var.fill_(9.0)
        bn.num_batches_tracked.fill_(40)
    batches = [torch.randn(5, 2, 3, 3) * 2 + 1, torch.randn(2, 2, 3, 3) - 3, torch.randn(3, 2, 3, 3)]
    stats = batch_statistics(net, batches)
    with torch.no_grad(), bn_recalibration(net):
        assert net.bn.momentum is None and net.bn1d.momentum is None
        for x in batches:
            net.train()(x)
    assert_plain_average({"bn": net.bn, "bn1d": net.bn1d}, stats)
    assert (net.bn.momentum, net.bn1d.momentum) == (0.3, 0.1)
    with pytest.raises(RuntimeError, match="inside"):
        with bn_recalibration(net):
            raise RuntimeError("inside")
    assert (net.bn.momentum, net.bn1d.momentum) == (0.3, 0.1)


def test_pretraining_re_estimates_the_backbones_bn_statistics_on_the_clean_training_images(monkeypatch):
    """After training (recalibrate_bn true), every BN layer of the backbone holds the plain average over the
    inference batches (in order) of the un-augmented training images' batch statistics, computed in train mode; the
    statistics of training (here: made-up ones) are gone and the momenta are back. On every 12th training image,
    in inference batches of 32 (so that there are several), to keep it fast."""
    method, data = make("contrastive_pretrain", "--recalibrate_bn", "true")
    indices = data.indices
    monkeypatch.setattr(data, "indices", lambda split, classes: indices(split, classes)[::12])
    backbone = method.network.backbone
    norms = {n: b for n, b in backbone.named_modules() if isinstance(b, torch.nn.BatchNorm2d)}
    for bn in norms.values():
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(7.0)
        bn.num_batches_tracked.fill_(100)
    clean = data.dataset("train", data.indices("train", data.tasks[0].classes), augment=False)
    x = torch.stack([clean[i][0] for i in range(len(clean))])
    stats = batch_statistics(backbone, x.split(32))
    assert {len(v) for v in stats.values()} == {4} and sorted(set(clean.targets.tolist())) == list(range(10))
    engine = Engine(torch.device("cpu"), amp=False)
    method.after_task(data.tasks[0], lambda fn, dataset, module, whole=False:
                      engine.infer(fn, dataset, module, batch_size=32, whole=whole))
    assert_plain_average(norms, stats, tol=1e-4)
    assert all(bn.momentum == 0.1 for bn in norms.values())
