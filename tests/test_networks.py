"""The network contract (backbone/network.py) on every network class, and the backbone contract on every registered
backbone and a few timm names: features of width `feature_dim`, a backward pass, and the `layer_names` a backbone
declares usable by adapters (ACL, DynaMMo) and POD-spatial (PODNet)."""
import pytest
import torch

import backbone  # noqa: F401  (registers every network module)
from backbone import BACKBONES, build_backbone
from backbone.adapted import AdaptedNet, CosinePrototypes
from backbone.adapters import AdapterNet
from backbone.bias_layer import BiasCorrectedNet
from backbone.cosine_linear import CosineIncrementalNet
from backbone.der_net import DERNet
from backbone.incremental_net import IncrementalNet
from backbone.network import Network
from backbone.ssl_heads import MoCoNet, SimSiamNet

SIZE = 16
#: how each network class is built around a backbone (a new network class must be added here)
NETWORKS = {
    IncrementalNet: IncrementalNet,
    BiasCorrectedNet: BiasCorrectedNet,
    CosineIncrementalNet: lambda b: CosineIncrementalNet(b, nb_proxy=2, layer_names=["stage_2"]),
    DERNet: DERNet,
    AdapterNet: lambda b: AdapterNet(b, ["stage_1", "stage_2"], SIZE, merged=True),
    AdaptedNet: lambda b: AdaptedNet(b, CosinePrototypes, "both", ["stage_1", "stage_2"], SIZE),
    MoCoNet: lambda b: MoCoNet(b, out_dim=8, K=16),
    SimSiamNet: lambda b: SimSiamNet(b, out_dim=8, pred_dim=4, proj_layers=2),
}


def subclasses(cls):
    return {c for s in cls.__subclasses__() for c in (s, *subclasses(s))}


def test_every_network_class_is_checked_here():
    assert {c for c in subclasses(Network) if not c.__name__.startswith("_")} == set(NETWORKS)


@pytest.mark.parametrize("cls", NETWORKS, ids=lambda c: c.__name__)
def test_every_network_follows_the_contract(cls):
    torch.manual_seed(0)
    net = NETWORKS[cls](build_backbone("resnet32"))
    x = torch.randn(4, 3, SIZE, SIZE)
    classifies = net.n_classes == 0 and cls not in (MoCoNet, SimSiamNet)
    for total in (2, 5):  # two tasks: [0, 2) then [2, 5)
        net.expand_head(total)
        assert net.n_classes == (total if classifies else 0)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        net.expand_head(total)  # no new class: nothing changes
        assert net.state_dict().keys() == before.keys() and all(torch.equal(v, before[k])
                                                                 for k, v in net.state_dict().items())
        net.train()
        out = net(x)
        assert out["features"].shape == (4, net.feature_dim)
        assert out["logits"].dim() == 2 and len(out["logits"]) == 4
        if classifies and cls is not AdapterNet:  # AdapterNet's logits: the newest task's head and "others"
            assert out["logits"].shape[1] == total
        (out["features"].sum() + out["logits"].sum()).backward()
        assert any(p.grad is not None for p in net.parameters())
        net.eval()
        with torch.no_grad():
            torch.testing.assert_close(net.features(x), net(x)["features"])
    extractor = net.backbones if cls is DERNet else net.backbone
    net.freeze_backbone()
    assert not any(p.requires_grad for p in extractor.parameters())
    in_extractor = {id(p) for p in extractor.parameters()}
    assert any(p.requires_grad for p in net.parameters() if id(p) not in in_extractor)  # what sits on top trains
    net.freeze_backbone(False)
    assert all(p.requires_grad for p in extractor.parameters())


def test_what_a_new_task_freezes():
    """Growing for a new task freezes the parts of earlier tasks that must stop learning, and only those."""
    cosine = NETWORKS[CosineIncrementalNet](build_backbone("resnet32"))
    adapters = NETWORKS[AdapterNet](build_backbone("resnet32"))
    der = DERNet(build_backbone("resnet32"))
    for net in (cosine, adapters, der):
        net.expand_head(2)
        net.expand_head(4)
    assert [p.requires_grad for p in cosine.head.parts] == [False, True]
    assert [a.conv.weight.requires_grad for a in adapters.adapters[0]] == [False, True]
    assert [h.weight.requires_grad for h in adapters.heads] == [False, True]
    assert [next(b.parameters()).requires_grad for b in der.backbones] == [False, True]
    assert der.feature_dim == 2 * 64 and der.fc.in_features == 128


BACKBONE_NAMES = [*BACKBONES.keys(), "resnet10t", "tf_efficientnet_lite0"]


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_every_backbone_gives_features_of_its_declared_width(name):
    torch.manual_seed(0)
    model = build_backbone(name).train()
    x = torch.randn(2, 3, 32, 32)
    features = model(x)
    assert features.shape == (2, model.feature_dim)
    features.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", [n for n in BACKBONES.keys() if BACKBONES.meta(n).get("layer_names")])
def test_declared_layer_names_carry_adapters_and_pod_maps(name):
    layers = list(BACKBONES.meta(name)["layer_names"])
    size = {"resnet32": 16, "cosine_resnet32": 16, "resnet18_cifar": 32, "mobilenet_v2": 96,
            "efficientnet_lite0": 65}.get(name, 64)  # the deepest point at /32 needs >= 3 px
    net = AdapterNet(build_backbone(name), layers, size)
    assert len(net.channels) == len(layers)
    net.expand_head(2)
    x = torch.randn(2, 3, size, size)
    assert net.eval().forward_paths(x, [0, 0]).shape == (2, 2, net.feature_dim)
    pod = CosineIncrementalNet(build_backbone(name), layer_names=layers)
    pod.expand_head(2)
    maps = pod(x)["maps"]
    assert len(maps) == len(layers) and all(m.dim() == 4 for m in maps)


def test_every_registered_backbone_declares_its_layer_names():
    assert [n for n in BACKBONES.keys() if not BACKBONES.meta(n).get("layer_names")] == []
