"""IncrementalNet: a backbone plus a linear head that grows with each task and keeps its old rows.

New rows start as in PyCIL's incremental networks: weights uniform with He's bound for a linear layer,
sqrt(3 / in_features), and zero biases (torch's default draws the biases too and makes the weights sqrt(3)
times smaller)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from backbone.network import Network


class IncrementalNet(Network):
    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.fc: nn.Linear | None = None

    @property
    def n_classes(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    def expand_head(self, n_classes: int) -> None:
        """Grow the head to `n_classes` outputs; old rows are copied, new rows freshly initialised."""
        if n_classes <= self.n_classes:
            return
        old, fc = self.fc, nn.Linear(self.feature_dim, n_classes)
        nn.init.kaiming_uniform_(fc.weight, nonlinearity="linear")
        nn.init.zeros_(fc.bias)
        if old is not None:
            fc = fc.to(old.weight.device)
            with torch.no_grad():
                fc.weight[: old.out_features] = old.weight
                fc.bias[: old.out_features] = old.bias
        self.fc = fc

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {"features": features, "logits": self.fc(features)}


def frozen_copy(network: nn.Module) -> nn.Module:
    """A deep copy of a network to distil from: no gradients, and (inside a Method) always in eval mode."""
    return copy.deepcopy(network).requires_grad_(False).eval()
