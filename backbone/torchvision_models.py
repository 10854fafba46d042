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


for _name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "efficientnet_b0"):
    BACKBONES.register(_name, source="torchvision")(
        lambda pretrained=False, pretrain_path=None, _name=_name: _torchvision(_name, pretrained, pretrain_path)
    )
