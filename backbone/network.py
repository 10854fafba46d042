"""The network contract: what a Method may rely on in the network it holds, whatever its class.

Every network class (`IncrementalNet`, `BiasCorrectedNet`, `CosineIncrementalNet`, `DERNet`, `AdapterNet`,
`AdaptedNet`, `MoCoNet`, `SimSiamNet`) subclasses `Network` and so offers, in one form each:

- `forward(x)` -> a dict holding at least "features" (B, feature_dim), the penultimate features, and "logits"
  (B, C), the scores of its classifier (a network may add keys: "aux_logits", "maps", "cosine", ...);
- `features(x)`: the same "features", the one way every method and loop reads features (exemplar selection,
  class means, imprinting);
- `feature_dim`: the width of those features (DER's grows with its extractors);
- `expand_head(n_classes)`: grow to cover classes [0, n_classes); whatever a new task adds to the network (a
  head part, DER's extractor, ACL's adapters) is added here, and the parts of earlier tasks that must stop
  learning are frozen here. A call that adds no class changes nothing;
- `freeze_backbone(frozen=True)`: stop (or restart) the feature extractor from learning; a frozen extractor
  also keeps its BN statistics, since a Method runs every module whose parameters are all frozen in eval mode.

`Method.begin_task` calls `expand_head(task.total)` at the start of every task; tests/test_networks.py checks
the contract on every network class and every registered backbone.
"""
from __future__ import annotations

import torch
from torch import nn


class Network(nn.Module):
    """A backbone (`self.backbone`, with `feature_dim`) plus whatever classifies its features."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    @property
    def n_classes(self) -> int:
        """The classes the network covers so far."""
        raise NotImplementedError

    def expand_head(self, n_classes: int) -> None:
        raise NotImplementedError

    def freeze_backbone(self, frozen: bool = True) -> None:
        self.backbone.requires_grad_(not frozen)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError
