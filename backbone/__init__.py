"""Backbone registry: every module in this package registers feature extractors by name.

A backbone is an `nn.Module` mapping images (B, 3, H, W) to features (B, D) with `feature_dim = D`; a registered
one declares `layer_names`, the modules whose inputs adapters (ACL, DynaMMo) and POD-spatial (PODNet) use
(`BACKBONES.meta(name)["layer_names"]`). Torchvision/timm models keep their module names (`layer1`,
`features.3`, ...), so `layer_names` in configs address the same layers as in the original code. Any timm model
name that is not registered here also works. The networks methods put around a backbone follow the contract of
backbone/network.py.
"""
from torch import nn

from utils.registry import Registry, UserError, import_submodules

BACKBONES = Registry("backbone")


def build_backbone(name: str, pretrained: bool = False, pretrain_path: str | None = None) -> nn.Module:
    """Build a registered backbone, or fall back to any timm model name."""
    if name not in BACKBONES:
        from backbone.timm_models import is_timm_model, timm_backbone

        if is_timm_model(name):
            return timm_backbone(name, pretrained, pretrain_path)
    return BACKBONES.get(name)(pretrained=pretrained, pretrain_path=pretrain_path)


import_submodules(__name__, __path__)

__all__ = ["BACKBONES", "build_backbone", "UserError"]
