"""IncrementalNet: a backbone plus a linear head that grows with each task and keeps its old rows."""
from __future__ import annotations

import copy

import torch
from torch import nn


class IncrementalNet(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = backbone.feature_dim
        self.fc: nn.Linear | None = None
        self.backbone_frozen = False

    @property
    def n_classes(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    def expand_head(self, n_classes: int) -> None:
        """Grow the head to `n_classes` outputs; old rows are copied, new rows freshly initialised."""
        if n_classes <= self.n_classes:
            return
        old, fc = self.fc, nn.Linear(self.feature_dim, n_classes)
        if old is not None:
            fc = fc.to(old.weight.device)
            with torch.no_grad():
                fc.weight[: old.out_features] = old.weight
                fc.bias[: old.out_features] = old.bias
        self.fc = fc

    def freeze_backbone(self) -> None:
        """Freeze the feature extractor (weights and BN statistics); only the head trains."""
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {"features": features, "logits": self.fc(features)}


def frozen_copy(network: nn.Module) -> nn.Module:
    """A deep copy of an IncrementalNet to distil from: no gradients, and its backbone stays in eval mode (BN
    statistics frozen) even when the method is put in train mode."""
    old = copy.deepcopy(network)
    old.freeze_backbone()
    old.requires_grad_(False)
    return old.eval()
