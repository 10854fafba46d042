"""ACL, DynaMMo and DER (dynamic_er): adapter shapes and sizes, the merges (known answers), the single merged pass,
inference cost of every merge variant, checkpoints, and ACL and DynaMMo runs of one seed sharing their task
adapters.

Known answers: DER's CE over the concatenated extractors, auxiliary CE with an "others" class and balanced-head CE,
its frozen old extractor; ACL's "others" CE of the new task's head on its own adapters and its min-others routing
(written out in _routing_by_hand); DynaMMo's merged adapters (the mean of the task adapters) and its prediction
through them; every merge strategy through DynaMMo's "merge" Action with its default lambda, the BN statistics
averaged or re-estimated (written out in _merge_by_hand and _plain_average); the merge strategies on hand-made
weights. The formulas are in tests/formulas.py, the builders of a
method on the digits fixture in tests/method_builders.py.

To add a method of this family, copy the test of ACL
(test_acl_stage_one_is_others_ce_of_the_new_tasks_head_on_its_own_adapters).
"""
import glob
import os

import numpy as np
import pytest
import torch

from backbone import build_backbone
from torch import nn

from backbone.adapters import MERGED, Adapter, AdapterNet, merge_vectors
from conftest import ROOT, known_answer, run_stage
from formulas import ce, close, logsumexp
from method_builders import build, perturb, positions, samples, start
from methods import build_method, method_config
from trainer.results import read_results
from trainer import checkpoint
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config
from datasets.scenario import DataManager
from trainer.flops import inference_cost
from utils.registry import UserError
from trainer.engine.engine import Engine
from utils.types import Action, OptimConfig, Stage


def make_method(name, *overrides):
    """The method of options/<name>/digits.yaml at 16 px, two classes per task, untrained."""
    argv = ["--device", "cpu", "--img_size", "16", "--init_cls", "2", "--increment", "2", *overrides]
    cfg = load_config(os.path.join(ROOT, "options", name, "digits.yaml"), parse_cli_overrides(argv), method_config)
    return build_method(cfg, DataManager(cfg, seed=1))


def add_tasks(method, n_tasks, seed=0):
    """Run begin_task for the next `n_tasks` tasks, giving every new adapter distinct random weights and BN
    statistics (as training would), and merge like DynaMMo does after each task."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_tasks):
        task = method.data.tasks[0 if method.task is None else method.task.index + 1]
        method.begin_task(task)
        if isinstance(method.network, AdapterNet):
            with torch.no_grad():
                for point in method.network.adapters:
                    for name, value in point[-1].state_dict().items():
                        if value.is_floating_point():
                            noise = torch.rand(value.shape, generator=generator)
                            value.copy_(0.5 + noise if name.endswith("running_var") else noise - 0.5)
            if method.network.merged is not None:
                method.merge(None, None)  # the configured strategy; no balanced set, so no BN re-estimation
    return method.eval()


def test_adapter_shapes_and_parameter_count_resnet18():
    net = AdapterNet(build_backbone("resnet18"), ["layer1", "layer2", "layer3", "layer4"], img_size=64)
    net.expand_head(net.n_classes + 10)
    assert net.channels == [64, 64, 128, 256]
    per_point = [sum(p.numel() for p in point[0].parameters()) for point in net.adapters]
    assert per_point == [18 * c * c + 6 * c + 1 for c in net.channels] == [74113, 74113, 295681, 1181185]
    assert sum(per_point) == 1_625_092
    x = torch.randn(2, 64, 7, 9)
    assert Adapter(64)(x).shape == x.shape
    net.expand_head(net.n_classes + 10)
    assert net.eval().forward_paths(torch.randn(3, 3, 64, 64), [0, 1]).shape == (2, 3, 512)
    assert [h.out_features for h in net.heads] == [11, 11]


def test_bad_layer_names_are_user_errors():
    with pytest.raises(UserError, match="did you mean 'stage_2'"):
        AdapterNet(build_backbone("resnet32"), ["stage_1", "stage2"], img_size=16)
    with pytest.raises(UserError, match="at least 3x3"):
        AdapterNet(build_backbone("resnet32"), ["stage_3"], img_size=4)
    with pytest.raises(UserError, match="in the order"):
        AdapterNet(build_backbone("resnet32"), ["stage_2", "stage_1"], img_size=16)


def test_merge_is_the_mean_of_the_task_adapters():
    net = add_tasks(make_method("dynammo"), 3).network
    for merged, adapters in zip(net.merged, net.adapters):
        for name, value in merged.state_dict().items():
            stacked = torch.stack([a.state_dict()[name].double() for a in adapters])
            if value.is_floating_point():
                assert torch.allclose(value.double(), stacked.mean(0), atol=1e-6), name
        assert not torch.equal(adapters[0].conv.weight, adapters[1].conv.weight)


# ---- merges: known answers on hand-made weights ----
THETAS = torch.tensor([[1.0, 1.0, 1.0, 1.0],   # theta_0, the reference point (the first task's adapters)
                       [1.5, 0.8, 1.0, 3.0],   # tau_1 = theta_1 - theta_0 = [0.5, -0.2, 0.0, 2.0]
                       [0.0, 1.1, 1.4, 2.0]],  # tau_2 = [-1.0, 0.1, 0.4, 1.0]
                      dtype=torch.float64)


@pytest.mark.parametrize("strategy, lam, keep, expected", [
    ("mean", 1.0, 0.2, [2.5 / 3, 2.9 / 3, 3.4 / 3, 2.0]),   # (theta_0 + theta_1 + theta_2) / 3
    ("task_arithmetic", 0.5, 0.2, [0.75, 0.95, 1.2, 2.5]),  # theta_0 + 0.5 (tau_1 + tau_2)
    ("magmax", 0.5, 0.2, [0.5, 0.9, 1.2, 2.0]),             # theta_0 + 0.5 [-1.0, -0.2, 0.4, 2.0] (larger |tau|)
    # keep 2 of 4 entries: tau'_1 = [0.5, 0, 0, 2], tau'_2 = [-1, 0, 0, 1]; elected signs (of the sum) [-, 0, 0, +];
    # mean of the agreeing entries [-1, 0, 0, 1.5]
    ("ties", 1.0, 0.5, [0.0, 1.0, 1.0, 2.5]),
])
def test_merge_known_answers(strategy, lam, keep, expected):
    assert torch.allclose(merge_vectors(THETAS, strategy, lam, keep), torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(merge_vectors(THETAS[:1], strategy, lam, keep), THETAS[0])  # after the first task: theta_0


class TwoPoints(nn.Module):
    """A backbone with two 1-channel insertion points: each adapter has 18 + 6 + 1 = 25 parameters."""

    feature_dim = 1

    def __init__(self):
        super().__init__()
        self.stem, self.body1, self.body2 = nn.Conv2d(3, 1, 1), nn.Identity(), nn.Identity()

    def forward(self, x):
        return self.body2(self.body1(self.stem(x))).mean((2, 3))


def expected_merge(thetas, strategy, lam, keep):
    """The merge written out entry by entry (thetas: T lists of N floats; the first is the reference)."""
    T, N = len(thetas), len(thetas[0])
    if strategy == "mean":
        return [sum(th[j] for th in thetas) / T for j in range(N)]
    taus = [[th[j] - thetas[0][j] for j in range(N)] for th in thetas[1:]]
    if strategy == "task_arithmetic":
        return [thetas[0][j] + lam * sum(tau[j] for tau in taus) for j in range(N)]
    if strategy == "magmax":
        return [thetas[0][j] + lam * max((tau[j] for tau in taus), key=abs) for j in range(N)]
    n_keep = round(keep * N)
    trimmed = []
    for tau in taus:
        threshold = sorted((abs(v) for v in tau), reverse=True)[n_keep - 1]
        trimmed.append([v if abs(v) >= threshold else 0.0 for v in tau])
    out = []
    for j in range(N):
        total = sum(tau[j] for tau in trimmed)
        agreeing = [tau[j] for tau in trimmed if tau[j] != 0 and (tau[j] > 0) == (total > 0)] if total else []
        out.append(thetas[0][j] + lam * (sum(agreeing) / len(agreeing) if agreeing else 0.0))
    return out


@pytest.mark.parametrize("strategy, lam", [("mean", 1.0), ("task_arithmetic", 0.5), ("ties", 1.0), ("magmax", 0.5)])
@pytest.mark.parametrize("alpha", ["strategy", "newest"])
def test_adapter_net_merges_the_whole_adapter_set_of_each_task(strategy, lam, alpha):
    """Three tasks of hand-made adapter weights at two points: the parameters of both points are merged as one
    vector per task (TIES trims over all of them), BN statistics are averaged, alpha follows `alpha`."""
    net = AdapterNet(TwoPoints(), ["body1", "body2"], img_size=4, merged=True)
    generator = torch.Generator().manual_seed(3)
    thetas = []
    for t in range(3):
        net.expand_head(net.n_classes + 2)
        values = []
        with torch.no_grad():
            for point in (0, 1):
                adapter = net.adapters[point][t]
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * (point + 1))
                    values += p.flatten().tolist()
                adapter.bn1.running_mean.fill_(t)
                adapter.bn2.running_var.fill_(1.0 + 2 * t)
        thetas.append(values)
    net.merge(strategy, lam, keep=0.3, alpha=alpha)
    merged = [v for adapter in net.merged for p in adapter.parameters() for v in p.flatten().tolist()]
    expected = expected_merge(thetas, strategy, lam, 0.3)
    assert len(merged) == 50
    for point in (0, 1):
        if alpha == "newest":  # alpha is each adapter's first parameter (its own, before the submodules')
            assert next(iter(net.merged[point].named_parameters()))[0] == "alpha"
            expected[25 * point] = thetas[2][25 * point]
        assert float(net.merged[point].bn1.running_mean[0]) == pytest.approx(1.0)   # (0 + 1 + 2) / 3
        assert float(net.merged[point].bn2.running_var[0]) == pytest.approx(3.0)    # (1 + 3 + 5) / 3
    assert merged == pytest.approx(expected, abs=1e-6)


def test_adapter_init_first_copies_the_first_tasks_adapters():
    method = add_tasks(make_method("acl", "--adapter_init", "first"), 2)
    task = method.data.tasks[2]
    method.begin_task(task)
    for point in method.network.adapters:
        assert torch.equal(point[2].conv.weight, point[0].conv.weight)
        assert not torch.equal(point[2].conv.weight, point[1].conv.weight)


@pytest.mark.parametrize("finetune", [False, True])
def test_finetune_merged_trains_the_merged_adapters_with_the_heads_in_stage_2(finetune):
    method = add_tasks(make_method("dynammo", "--finetune_merged", str(finetune).lower()), 2)
    task = method.task
    merged = {k: v.clone() for k, v in method.network.merged.state_dict().items()}
    heads, task_adapters = method.network.heads[0].weight.clone(), method.network.adapters.state_dict()
    task_adapters = {k: v.clone() for k, v in task_adapters.items()}
    data = method.data.dataset("train", method.data.indices("train", range(task.total))[:64])
    run_stage(method, Engine(torch.device("cpu")), task, "heads", None, data=lambda: data,
              optim=OptimConfig(epochs=1, lrate=0.01, batch_size=16, opt_type="adam"))
    changed = {k for k, v in method.network.merged.state_dict().items() if not torch.equal(v, merged[k])}
    assert not torch.equal(method.network.heads[0].weight, heads)
    assert ("0.conv.weight" in changed) == finetune and ("0.alpha" in changed) == finetune
    assert not any(p.requires_grad for p in method.network.merged.parameters())  # flags restored after the stage
    assert all(torch.equal(v, task_adapters[k]) for k, v in method.network.adapters.state_dict().items())


def test_merged_single_pass_equals_every_path_through_the_merged_adapters():
    method = add_tasks(make_method("dynammo"), 3)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        fast = method.predict(x)
        method.paths = lambda: [MERGED] * 3  # the slow way: T paths, each with the merged adapters
        slow = method.predict(x)
    assert fast["cnn"].shape == (5, 6)
    assert torch.allclose(fast["cnn"], slow["cnn"], atol=1e-5)
    assert torch.equal(fast["task_id"], slow["task_id"])
    assert torch.allclose(method.openset_confidence(fast), fast["cnn"].max(1).values)


def test_acl_routes_to_the_head_with_the_lowest_others_probability():
    torch.manual_seed(0)  # an input where no two heads' "others" probabilities tie to float precision
    method = add_tasks(make_method("acl"), 3)
    with torch.no_grad():
        x = torch.randn(6, 3, 16, 16)
        scores = method.predict(x)
        saturated = method.predict(100 * x)  # every class probability of some heads underflows
        probs = [torch.softmax(z, 1) for z in method.head_logits(method.network.forward_paths(x, [0, 1, 2]))]
    others = torch.stack([p[:, -1] for p in probs], 1)
    assert torch.equal(scores["task_id"], others.argmin(1))
    pred = scores["cnn"].argmax(1)
    expected = torch.stack([2 * t + probs[t][i, :-1].argmax() for i, t in enumerate(others.argmin(1).tolist())])
    assert torch.equal(pred, expected)
    assert torch.allclose(method.openset_confidence(scores), 1 - others.min(1).values, atol=1e-6)
    assert torch.isfinite(saturated["cnn"]).all()


def costs(name, n_tasks):
    """GFLOPs of predict on a 16 px image after each of the first n_tasks tasks."""
    method = make_method(name)
    return [inference_cost(add_tasks(method, 1), 16, torch.device("cpu"))[0] for _ in range(n_tasks)]


#: DynaMMo variants (merge strategy, adapter init, alpha rule, fine-tuned merge): each strategy once, the other
#: switches spread over them
VARIANTS = [("mean", "previous", "strategy", "false"), ("task_arithmetic", "first", "newest", "true"),
            ("ties", "first", "strategy", "true"), ("magmax", "previous", "newest", "false")]


def variant_args(strategy, init, alpha, finetune):
    return ["--merge_strategy", strategy, "--adapter_init", init, "--alpha_merge", alpha, "--finetune_merged", finetune]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_gflops_flat_for_every_dynammo_variant_and_linear_for_acl_and_der(variant):
    method = make_method("dynammo", *variant_args(*variant))
    dynammo = [inference_cost(add_tasks(method, 1), 16, torch.device("cpu"))[0] for _ in range(3)]
    assert max(dynammo) == pytest.approx(min(dynammo), rel=1e-3)
    if variant[0] != "mean":
        return
    acl, der = costs("acl", 3), costs("dynamic_er", 3)
    assert acl[0] == pytest.approx(dynammo[0], rel=1e-3)
    steps = np.diff([0.0, *acl])  # stem + one path, then one path per task
    assert steps[1] > 0.8 * acl[0] and steps[2] == pytest.approx(steps[1], rel=1e-3)
    assert der == pytest.approx([der[0] * t for t in (1, 2, 3)], rel=1e-3)


@pytest.mark.parametrize("name", ["dynammo", "dynamic_er"])
def test_checkpoint_restores_every_adapter_head_and_branch(name):
    method = add_tasks(make_method(name), 2, seed=1)
    method.memory.exemplars = {0: np.arange(3), 1: np.arange(5, 9)}
    state, extra = method.state_dict(), method.extra_state()
    restored = make_method(name)
    for task in restored.data.tasks[:2]:  # the documented restore: replay begin_task, then load
        restored.begin_task(task)
    restored.load_state_dict(state)
    restored.load_extra_state(extra)
    restored.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        for key, value in method.predict(x).items():
            assert torch.equal(value, restored.predict(x)[key]), key
    assert set(restored.state_dict()) == set(state)
    assert {c: v.tolist() for c, v in restored.memory.exemplars.items()} == {0: [0, 1, 2], 1: [5, 6, 7, 8]}


def test_acl_and_dynammo_of_one_seed_share_their_task_adapters(tmp_path):
    """Merging changes only what inference and stage 2 see: stage 1 of every task, the memory and the global RNG
    stream are the same for ACL and DynaMMo of one seed, so every task adapter is identical (three tasks: the BN
    re-estimation after task 1's merge used to shift the RNG and make task 2's adapters differ)."""
    import main

    args = ["--device", "cpu", "--seed", "1", "--epochs", "1", "--init_epochs", "1", "--init_cls", "4",
            "--increment", "3", "--img_size", "8", "--epochs_finetune", "1", "--openset_test", "true"]
    states, results = {}, {}
    for name, extra in (("acl", []), ("dynammo", ["--recalibrate_bn", "true", "--merge_strategy", "ties",
                                                    "--finetune_merged", "true"])):
        root = tmp_path / name
        results[name] = read_results(main.main(["--config", os.path.join(ROOT, "options", name, "digits.yaml"),
                                                *args, *extra, "--log_root", str(root)]))
        states[name] = checkpoint.load(glob.glob(str(root / "**" / "seed1_latest.pt"), recursive=True)[0])["method"]
    adapters = [k for k in states["acl"] if k.startswith("network.adapters.")]
    assert len(adapters) == 3 * 3 * 15  # 3 points x 3 tasks x (9 parameters + 2 x 3 BN buffers)
    for k in adapters:
        assert torch.equal(states["acl"][k], states["dynammo"][k]), k
    assert not torch.equal(states["acl"]["network.heads.0.weight"], states["dynammo"]["network.heads.0.weight"])
    tasks = results["dynammo"]["runs"][0]["tasks"]
    assert [0.0 <= t["task_id_acc"] <= 100.0 for t in tasks] == [True] * 3
    assert tasks[0]["task_id_acc"] == 100.0  # one head: every sample is routed to task 0
    assert 0.0 <= tasks[0]["openset"]["auroc"] <= 100.0 and tasks[2]["openset"] is None
    assert tasks[2]["gflops"] == pytest.approx(tasks[0]["gflops"], rel=1e-3)


def test_acl_without_memory_is_a_user_error():
    with pytest.raises(UserError, match="memory_size > 0"):
        make_method("acl", "--memory_size", "0")


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
    close(balanced["balanced_ce"], ce(method.balanced_fc(torch.cat(features, 1)).double() / method.cfg.T, y, 0, 4))


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
def test_acl_heads_per_batch_present_trains_only_the_heads_of_the_tasks_in_the_batch():
    """heads_per_batch: present (the original's stage 2): (1 / T) Σ over the heads whose task has a sample in the
    batch; an absent task's head gets no gradient. With `all` every head gets one."""
    method = _adapter_method("acl", 3, "--heads_per_batch", "present")
    x, y = samples(method, [0, 1, 4, 5])  # tasks 0 and 2, none of task 1
    heads = method.network.heads
    for head in heads:  # stage 2 trains every head
        head.weight.requires_grad_(True)
    method.train()
    loss = method.heads_step(x, y)["heads_ce"]
    features = method.network.forward_paths(x, [0, 1, 2])
    others = [torch.where((y >= lo) & (y < lo + 2), y - lo, torch.full_like(y, 2)) for lo in (0, 2, 4)]
    per_head = [ce(method.network.heads[i](features[i]), others[i], 0, 3) for i in range(3)]
    close(loss, (per_head[0] + per_head[2]) / 3)
    grads = torch.autograd.grad(loss, [heads[i].weight for i in range(3)], allow_unused=True)
    assert grads[1] is None or not grads[1].any()
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0
    method.cfg = method.cfg.replace(heads_per_batch="all")
    close(method.heads_step(x, y)["heads_ce"], sum(per_head) / 3)


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


# ---- DynaMMo's merge options, through the method ----
def _dynammo_after_three_tasks(*overrides):
    """DynaMMo (digits, 8 px, adapters before stage_1..stage_3) in its third task, every task's adapters at every
    point set to distinct seeded random parameters and BN statistics (10 (t + 1) batches counted), and a memory of
    two exemplars of each old class; the balanced set is drawn at random (no inference)."""
    method = build("dynammo", "--memory_size", "12", "--sampling_method", "random", *overrides)
    for t in range(3):
        start(method, t)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for point in method.network.adapters:
            for t, adapter in enumerate(point):
                for p in adapter.parameters():
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
                for bn in (adapter.bn1, adapter.bn2):
                    bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator))
                    bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=generator))
                    bn.num_batches_tracked.fill_(10 * (t + 1))
    method.memory.exemplars = {c: positions(method, [c], per_class=2) for c in range(4)}
    return method


def _task_sets(net):
    """Each task's adapter parameters at every point, {(point, name): float64 tensor}."""
    return [{(i, n): p.detach().double().clone() for i, point in enumerate(net.adapters)
             for n, p in point[t].named_parameters()} for t in range(len(net.adapters[0]))]


def _merge_by_hand(sets, strategy, lam, keep):
    """The merge formulas of backbone/adapters.py's docstring on {(point, name): tensor} sets, theta_0 = sets[0]:
    mean; theta_0 + lam sum_t tau_t; TIES (trim each tau_t to its `keep` share of largest magnitudes over the whole
    set, elect the sign of the sum, average the entries agreeing with it); MagMax (per entry the tau_t of largest
    magnitude)."""
    names, theta0 = list(sets[0]), sets[0]
    if strategy == "mean":
        return {n: sum(s[n] for s in sets) / len(sets) for n in names}
    taus = [{n: s[n] - theta0[n] for n in names} for s in sets[1:]]
    if strategy == "task_arithmetic":
        return {n: theta0[n] + lam * sum(tau[n] for tau in taus) for n in names}
    if strategy == "magmax":
        out = {}
        for n in names:
            best = taus[0][n]
            for tau in taus[1:]:
                best = torch.where(tau[n].abs() > best.abs(), tau[n], best)
            out[n] = theta0[n] + lam * best
        return out
    trimmed = []
    for tau in taus:
        magnitudes = torch.cat([tau[n].abs().flatten() for n in names]).sort(descending=True).values
        threshold = magnitudes[round(keep * len(magnitudes)) - 1]
        trimmed.append({n: torch.where(tau[n].abs() >= threshold, tau[n], torch.zeros_like(tau[n])) for n in names})
    out = {}
    for n in names:
        sign = torch.sign(sum(tau[n] for tau in trimmed))
        agreeing = [(tau[n] != 0) & (torch.sign(tau[n]) == sign) for tau in trimmed]
        total = sum(torch.where(a, tau[n], torch.zeros_like(tau[n])) for a, tau in zip(agreeing, trimmed))
        count = sum(a.double() for a in agreeing)
        out[n] = theta0[n] + lam * torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return out


def _record_bn_inputs(network, into):
    """Hooks that append, while a merged adapter's BN runs in train mode, its input to into[(point, bn name)]."""
    def record(key):
        def hook(bn, args, out):
            if bn.training:
                into.setdefault(key, []).append(args[0].detach().clone())
        return hook

    return [getattr(adapter, name).register_forward_hook(record((i, name)))
            for i, adapter in enumerate(network.merged) for name in ("bn1", "bn2")]


def _merged_bn_inputs(network, x, batch_size, autocast):
    """{(point, bn name): [its input in each batch]}: batches of x in order through the merged path of the network
    in eval mode, its merged adapters in train mode, under `autocast` (the engine's). Not on a copy (the adapters'
    hooks belong to the network that registered them), so this changes the merged BN statistics: read them first."""
    inputs = {}
    hooks = _record_bn_inputs(network, inputs)
    network.eval()
    network.merged.train()
    try:
        with torch.no_grad(), autocast:
            for batch in x.split(batch_size):
                network.forward_paths(batch, [MERGED])
    finally:
        for h in hooks:
            h.remove()
        network.eval()
    return inputs


def _plain_average(batches):
    """The mean over the batches of each channel's batch mean and unbiased batch variance, in float64."""
    means, variances = [], []
    for h in batches:
        h = h.double()
        mean = h.mean((0, 2, 3))
        means.append(mean)
        variances.append(((h - mean.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3)) / (h.numel() // h.shape[1] - 1))
    return sum(means) / len(means), sum(variances) / len(variances)


#: merge_lambda when it is not set (the module docstring of methods/multi_steps/dynammo.py)
DOCUMENTED_LAMBDA = {"mean": 1.0, "task_arithmetic": 0.5, "ties": 1.0, "magmax": 0.5}


@known_answer("dynammo")
@pytest.mark.parametrize("recalibrate", [False, True], ids=["averaged_bn", "recalibrated_bn"])
@pytest.mark.parametrize("strategy", ["mean", "task_arithmetic", "ties", "magmax"])
def test_dynammo_merge_action_known_answers(strategy, recalibrate, monkeypatch):
    """The "merge" Action of DynaMMo's third task, merge_lambda and ties_keep unset: the merged adapters are the
    strategy's formula over the three task adapter sets with the documented default lambda and keep 0.2; the BN
    statistics are the task adapters' average, or with recalibrate_bn the plain average over the inference batches
    (5 images each here) of the un-augmented balanced set through the merged path in train mode, the old ones gone.
    The digits' train augmentation is made to flip every image, so that augmented images would show."""
    from torchvision import transforms as T

    from datasets.digits import Digits

    monkeypatch.setattr(Digits, "train_augment", lambda self: [T.RandomHorizontalFlip(p=1.0)])
    method = _dynammo_after_three_tasks("--merge_strategy", strategy, "--recalibrate_bn", str(recalibrate).lower())
    net, task = method.network, method.task
    sets = _task_sets(net)
    expected = _merge_by_hand(sets, strategy, DOCUMENTED_LAMBDA[strategy], 0.2)
    bn_means = {(i, f"{bn}.{stat}"): torch.stack([getattr(getattr(a, bn), stat).double() for a in point]).mean(0)
                for i, point in enumerate(net.adapters) for bn in ("bn1", "bn2")
                for stat in ("running_mean", "running_var")}
    untouched = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("merged.")}
    engine, calls, seen = Engine(torch.device("cpu"), amp=False), [], {}

    def infer(fn, dataset, module, whole=False):
        calls.append(dataset)
        return engine.infer(fn, dataset, module, batch_size=5, whole=whole)

    merge, = [s for s in method.stages(task, None, infer) if isinstance(s, Action)]
    assert merge.name == "merge"
    hooks = _record_bn_inputs(net, seen)  # what the merged BN layers see in train mode during the merge
    with torch.no_grad():
        merge.run()
    for h in hooks:
        h.remove()
    for i, adapter in enumerate(net.merged):
        for n, p in adapter.named_parameters():
            torch.testing.assert_close(p.double(), expected[(i, n)], rtol=1e-6, atol=1e-7, msg=f"{i}.{n}")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in untouched.items())  # task adapters, backbone, heads
    if not recalibrate:
        assert not calls and not seen
        for (i, name), mean in bn_means.items():
            torch.testing.assert_close(net.merged[i].get_buffer(name).double(), mean, rtol=1e-6, atol=1e-6)
        assert all(int(a.bn1.num_batches_tracked) == 20 for a in net.merged)  # floor of (10 + 20 + 30) / 3
        return
    result = {(i, name): getattr(adapter, name) for i, adapter in enumerate(net.merged) for name in ("bn1", "bn2")}
    result = {k: (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked), bn.momentum)
              for k, bn in result.items()}
    assert set(seen) == set(result)
    for key, (running_mean, running_var, batches, momentum) in result.items():  # the plain average, old ones gone
        mean, var = _plain_average(seen[key])
        torch.testing.assert_close(running_mean.double(), mean, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        torch.testing.assert_close(running_var.double(), var, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        assert (batches, momentum) == (3, 0.1), (key, batches, momentum)
    # ... of the batches of the un-augmented balanced set (old exemplars and two of each new class), in order, through
    # the merged path (recomputed here with the engine's autocast: none, amp is off)
    balanced = calls[-1].indices
    assert np.bincount(method.data.train_y[balanced]).tolist() == [2] * 6
    clean = method.data.dataset("train", balanced, augment=False)
    x, _ = clean.batch(torch.arange(len(clean)), torch.device("cpu"))  # the images as the engine reads them
    by_hand = _merged_bn_inputs(net, engine.to_device(x), 5, engine.autocast())
    for key, inputs in by_hand.items():
        assert [len(h) for h in inputs] == [len(h) for h in seen[key]] == [5, 5, 2]
        for h, h_seen in zip(inputs, seen[key]):
            torch.testing.assert_close(h_seen.double(), h.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["task_arithmetic", "ties", "magmax"])
def test_dynammo_merge_lambda_and_ties_keep_override_the_defaults(strategy):
    method = _dynammo_after_three_tasks("--merge_strategy", strategy, "--merge_lambda", "0.3", "--ties_keep", "0.4",
                                        "--recalibrate_bn", "false")
    expected = _merge_by_hand(_task_sets(method.network), strategy, 0.3, 0.4)
    with torch.no_grad():
        method.merge(None, None)
    for i, adapter in enumerate(method.network.merged):
        for n, p in adapter.named_parameters():
            torch.testing.assert_close(p.double(), expected[(i, n)], rtol=1e-6, atol=1e-7, msg=f"{i}.{n}")


def test_dynammo_default_merge_lambdas_are_the_documented_ones():
    from methods.multi_steps.dynammo import DEFAULT_LAMBDA, DynaMMoConfig

    assert DEFAULT_LAMBDA == DOCUMENTED_LAMBDA
    assert DynaMMoConfig.merge_lambda is None and DynaMMoConfig.ties_keep == 0.2


@pytest.mark.parametrize("finetune", [False, True])
def test_dynammo_stage_2_trains_the_heads_and_with_finetune_merged_the_merged_adapters_never_the_task_ones(finetune):
    """What requires grad inside the heads stage: every task head, plus the merged adapters with finetune_merged;
    never a task adapter or the backbone. Afterwards the flags are as before."""
    method = _dynammo_after_three_tasks("--finetune_merged", str(finetune).lower())
    net, task = method.network, method.task
    with torch.no_grad():
        method.merge(None, None)
    before = {n: p.requires_grad for n, p in method.named_parameters()}
    stage, = [s for s in method.stages(task, None, None) if getattr(s, "name", None) == "heads"]
    trained = []

    def recording(x, y):
        trained.append({n for n, p in method.named_parameters() if p.requires_grad})
        return stage.step(x, y)

    data = method.data.dataset("train", positions(method, range(6), per_class=2))
    run_stage(method, Engine(torch.device("cpu"), amp=False), task, "heads", None, data=lambda: data, step=recording,
              optim=OptimConfig(epochs=1, lrate=0.01, batch_size=12, opt_type="adam"))
    heads = {f"network.heads.{n}" for n, _ in net.heads.named_parameters()}
    merged = {f"network.merged.{n}" for n, _ in net.merged.named_parameters()}
    assert len(heads) == 6 and len(merged) == 27
    assert trained == [heads | merged if finetune else heads]
    assert {n: p.requires_grad for n, p in method.named_parameters()} == before
