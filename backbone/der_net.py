"""DERNet: one feature extractor per task, a classifier over their concatenated features, an auxiliary head.

DER (Yan, Xie, He; CVPR 2021) without pruning. Every later task adds a copy of the newest extractor (so it starts
from the previous task's weights); the older ones are frozen (and so, inside a Method, in eval mode). The
classifier grows to Linear(t * D, seen classes) with the previous classifier copied into its old block; the
auxiliary head Linear(D, new classes + 1) reads the newest extractor only, its last output meaning "an old
class". `feature_dim` is the width of the concatenated features, t * D.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from backbone.network import Network


class DERNet(Network):
    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.backbones = nn.ModuleList([backbone])
        del self.backbone  # registered once, as the first extractor
        self.branch_dim = backbone.feature_dim
        self.fc: nn.Linear | None = None
        self.aux_fc: nn.Linear | None = None

    @property
    def feature_dim(self) -> int:
        return self.branch_dim * len(self.backbones)

    @property
    def n_classes(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    def expand_head(self, n_classes: int) -> None:
        """A new task of classes [n_classes so far, n_classes): after the first task a new extractor, then a
        classifier initialised from the previous one in its old block, and the auxiliary head."""
        known, previous_fc = self.n_classes, self.fc
        if n_classes <= known:
            return
        if previous_fc is not None:
            self.backbones.append(copy.deepcopy(self.backbones[-1]))
        for old in self.backbones[:-1]:
            old.requires_grad_(False)
        self.backbones[-1].requires_grad_(True)
        device = next(self.backbones[-1].parameters()).device
        fc = nn.Linear(self.feature_dim, n_classes).to(device)
        if previous_fc is not None:
            with torch.no_grad():
                fc.weight[: previous_fc.out_features, : previous_fc.in_features] = previous_fc.weight
                fc.bias[: previous_fc.out_features] = previous_fc.bias
        self.fc = fc
        self.aux_fc = nn.Linear(self.branch_dim, n_classes - known + 1).to(device) if known else None

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Freeze (or release) every extractor (`expand_head` makes a new one trainable)."""
        self.backbones.requires_grad_(not frozen)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([backbone(x) for backbone in self.backbones], 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(x)
        out = {"features": features, "logits": self.fc(features)}
        if self.aux_fc is not None and self.training:
            out["aux_logits"] = self.aux_fc(features[:, -self.branch_dim:])
        return out
