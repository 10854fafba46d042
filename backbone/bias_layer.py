"""BiC's bias correction (Wu et al., CVPR 2019): one affine layer (alpha, beta) per task on that task's logits.

`BiasCorrectedNet` is an IncrementalNet whose head grows one `BiasLayer` per task; its forward returns the
corrected logits as "logits" and the linear head's own output as "raw_logits". A new layer starts as the
identity (alpha 1, beta 0).
"""
from __future__ import annotations

import torch
from torch import nn

from backbone.incremental_net import IncrementalNet


class BiasLayer(nn.Module):
    """z -> alpha * z + beta on the `n_classes` logits of one task (two scalars)."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.alpha * logits + self.beta


class BiasCorrectedNet(IncrementalNet):
    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.bias_layers = nn.ModuleList()

    def expand_head(self, n_classes: int) -> None:
        """Grow the linear head and add an identity bias layer for the new classes."""
        added = n_classes - self.n_classes
        super().expand_head(n_classes)
        if added > 0:
            self.bias_layers.append(BiasLayer(added).to(self.fc.weight.device))

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply every task's (alpha, beta) to its slice of the logits."""
        parts = logits.split([layer.n_classes for layer in self.bias_layers], dim=1)
        return torch.cat([layer(part) for layer, part in zip(self.bias_layers, parts)], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        return {**out, "raw_logits": out["logits"], "logits": self.correct(out["logits"])}
