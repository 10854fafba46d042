"""ACL, DynaMMo and DER: adapter shapes and sizes, the merge, the single merged pass, inference cost, checkpoints."""
import os

import numpy as np
import pytest
import torch

from backbone import build_backbone
from backbone.adapters import MERGED, Adapter, AdapterNet
from conftest import ROOT, TINY
from methods import build_method, method_config
from utils.config import load_config, parse_cli_overrides
from datasets.scenario import DataManager
from utils.flops import inference_cost
from utils.registry import UserError


def make_method(name, *overrides):
    """The method of options/<name>/digits.yaml at 16 px, two classes per task, untrained."""
    argv = ["--device", "cpu", "--img_size", "16", "--init_cls", "2", "--increment", "2", *overrides]
    cfg = load_config(os.path.join(ROOT, "options", name, "digits.yaml"), parse_cli_overrides(argv), method_config)
    return build_method(cfg, DataManager(cfg, seed=1))


def add_tasks(method, n_tasks, seed=0):
    """Run before_task for the next `n_tasks` tasks, giving every new adapter distinct random weights and BN
    statistics (as training would), and merge like DynaMMo does after each task."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_tasks):
        task = method.data.tasks[0 if method.task is None else method.task.index + 1]
        method.task = task
        method.before_task(task)
        if isinstance(method.network, AdapterNet):
            with torch.no_grad():
                for point in method.network.adapters:
                    for name, value in point[-1].state_dict().items():
                        if value.is_floating_point():
                            noise = torch.rand(value.shape, generator=generator)
                            value.copy_(0.5 + noise if name.endswith("running_var") else noise - 0.5)
            if method.network.merged is not None:
                method.network.merge()
    return method.eval()


def test_adapter_shapes_and_parameter_count_resnet18():
    net = AdapterNet(build_backbone("resnet18"), ["layer1", "layer2", "layer3", "layer4"], img_size=64)
    net.add_task(10)
    assert net.channels == [64, 64, 128, 256]
    per_point = [sum(p.numel() for p in point[0].parameters()) for point in net.adapters]
    assert per_point == [18 * c * c + 6 * c + 1 for c in net.channels] == [74113, 74113, 295681, 1181185]
    assert sum(per_point) == 1_625_092
    x = torch.randn(2, 64, 7, 9)
    assert Adapter(64)(x).shape == x.shape
    net.add_task(10)
    assert net.eval()(torch.randn(3, 3, 64, 64), [0, 1]).shape == (2, 3, 512)
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
    method = add_tasks(make_method("acl"), 3)
    with torch.no_grad():
        x = torch.randn(6, 3, 16, 16)
        scores = method.predict(x)
        probs = [torch.softmax(z, 1) for z in method.head_logits(method.network(x, [0, 1, 2]))]
    others = torch.stack([p[:, -1] for p in probs], 1)
    assert torch.equal(scores["task_id"], others.argmin(1))
    pred = scores["cnn"].argmax(1)
    expected = torch.stack([2 * t + probs[t][i, :-1].argmax() for i, t in enumerate(others.argmin(1).tolist())])
    assert torch.equal(pred, expected)
    assert torch.allclose(method.openset_confidence(scores), 1 - others.min(1).values, atol=1e-6)


def costs(name, n_tasks):
    """GFLOPs of predict on a 16 px image after each of the first n_tasks tasks."""
    method = make_method(name)
    return [inference_cost(add_tasks(method, 1), 16, torch.device("cpu"))[0] for _ in range(n_tasks)]


def test_gflops_flat_for_dynammo_and_linear_for_acl_and_der():
    dynammo, acl, der = costs("dynammo", 3), costs("acl", 3), costs("dynamic_er", 3)
    assert max(dynammo) == pytest.approx(min(dynammo), rel=1e-3)
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
    for task in restored.data.tasks[:2]:  # the documented restore: replay before_task, then load
        restored.task = task
        restored.before_task(task)
    restored.load_state_dict(state)
    restored.load_extra_state(extra)
    restored.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        for key, value in method.predict(x).items():
            assert torch.equal(value, restored.predict(x)[key]), key
    assert set(restored.state_dict()) == set(state)
    assert {c: v.tolist() for c, v in restored.memory.exemplars.items()} == {0: [0, 1, 2], 1: [5, 6, 7, 8]}


def test_dynammo_run_reports_task_id_openset_and_flat_gflops(run_main):
    results, _ = run_main("--config", os.path.join(ROOT, "options", "dynammo", "digits.yaml"), *TINY,
                          "--epochs_finetune", "2", "--recalibrate_bn", "true", "--openset_test", "true")
    tasks = results["runs"][0]["tasks"]
    assert [0.0 <= t["task_id_acc"] <= 100.0 for t in tasks] == [True, True]
    assert tasks[0]["task_id_acc"] == 100.0  # one head: every sample is routed to task 0
    assert 0.0 <= tasks[0]["openset"]["auroc"] <= 100.0 and tasks[1]["openset"] is None
    assert tasks[1]["gflops"] == pytest.approx(tasks[0]["gflops"], rel=1e-3)


def test_acl_without_memory_is_a_user_error():
    with pytest.raises(UserError, match="memory_size > 0"):
        make_method("acl", "--memory_size", "0")
