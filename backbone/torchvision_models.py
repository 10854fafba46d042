"""Torchvision ImageNet backbones (resnet18/34/50, mobilenet_v2, efficientnet_b0) with the classifier removed.

Module names are torchvision's, so `layer_names` such as `layer3` or `features.12` address the same layers as in
the original code. Weights come from `pretrain_path` or torchvision's cache (see backbone/pretrained.py).
"""
from torch import nn
from torchvision import models

from backbone import BACKBONES
from backbone.pretrained import load_pretrained, torchvision_cache_file


def _torchvision(name: str, pretrained: bool, pretrain_path: str | None) -> nn.Module:
    model = models.get_model(name, weights=None)
    if name.startswith("resnet"):
        model.feature_dim = model.fc.in_features
        model.fc = nn.Identity()
    else:  # mobilenet_v2 / efficientnet: classifier = Sequential(Dropout, Linear)
        model.feature_dim = model.classifier[-1].in_features
        model.classifier = nn.Identity()
    if pretrained:
        load_pretrained(model, name, pretrain_path, torchvision_cache_file(name))
    return model


#: the modules whose inputs adapters (ACL, DynaMMo) and POD-spatial (PODNet) use: the ResNets' four stages,
#: the original's four points of mobilenet_v2, and efficientnet_b0's stages that halve the map
_STAGES = ("layer1", "layer2", "layer3", "layer4")
LAYER_NAMES = {"resnet18": _STAGES, "resnet34": _STAGES, "resnet50": _STAGES,
               "mobilenet_v2": ("features.3", "features.5", "features.12", "features.15"),
               "efficientnet_b0": ("features.2", "features.3", "features.4", "features.6")}

for _name in LAYER_NAMES:
    BACKBONES.register(_name, source="torchvision", layer_names=LAYER_NAMES[_name])(
        lambda pretrained=False, pretrain_path=None, _name=_name: _torchvision(_name, pretrained, pretrain_path)
    )
