"""DERNet: one feature extractor per task, a classifier over their concatenated features, an auxiliary head.

DER (Yan, Xie, He; CVPR 2021) without pruning. Task t adds a copy of the newest extractor (so it starts from the
previous task's weights); the older ones are frozen (and so, inside a Method, in eval mode). The classifier grows to
Linear(t * D, seen classes) with the previous classifier copied into its old block; the auxiliary head
Linear(D, new classes + 1) reads the newest extractor only, its last output meaning "an old class".
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class DERNet(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbones = nn.ModuleList([backbone])
        self.feature_dim = backbone.feature_dim
        self.fc: nn.Linear | None = None
        self.aux_fc: nn.Linear | None = None

    def add_task(self, known: int, total: int, previous_fc: nn.Linear | None) -> None:
        """Extend to a new task of classes [known, total): a new extractor (after the first task), a classifier
        initialised from `previous_fc` in its old block, and the auxiliary head."""
        if previous_fc is not None:
            self.backbones.append(copy.deepcopy(self.backbones[-1]))
        for old in self.backbones[:-1]:
            old.requires_grad_(False)
        self.backbones[-1].requires_grad_(True)
        device = next(self.backbones[-1].parameters()).device
        fc = nn.Linear(self.feature_dim * len(self.backbones), total).to(device)
        if previous_fc is not None:
            with torch.no_grad():
                fc.weight[: previous_fc.out_features, : previous_fc.in_features] = previous_fc.weight
                fc.bias[: previous_fc.out_features] = previous_fc.bias
        self.fc = fc
        self.aux_fc = nn.Linear(self.feature_dim, total - known + 1).to(device) if known else None

    def freeze_backbone(self) -> None:
        """Freeze every extractor (`add_task` makes the newest trainable again)."""
        self.backbones.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.cat([backbone(x) for backbone in self.backbones], 1)
        out = {"features": features, "logits": self.fc(features)}
        if self.aux_fc is not None and self.training:
            out["aux_logits"] = self.aux_fc(features[:, -self.feature_dim:])
        return out
