"""Networks of self-supervised pretraining (methods/pretrain/contrastive_pretrain.py): a backbone with the heads
MoCo v2 or SimSiam put on top of it. Only the backbone is kept after pretraining.

- `MoCoNet` (He et al. CVPR 2020; Chen et al. arXiv 2003.04297, "MoCo v2"): the query encoder is the backbone
  plus a 2-layer MLP head D -> D -> out_dim (ReLU between, no BN; `head_bn` puts a BN on the hidden layer, as
  MoCo v3 does); the key encoder is a copy of both, never
  trained by gradient but moved towards the query encoder after every step, theta_k <- m theta_k + (1 - m)
  theta_q; a queue of K L2-normalised keys (a buffer, so checkpoints hold it) supplies the negatives.
- `SimSiamNet` (Chen & He CVPR 2021): the backbone plus a projection MLP of `proj_layers` Linear-BN layers
  (ReLU between; the last BN without affine parameters, as in the authors' code) to out_dim, and a predictor
  out_dim -> pred_dim -> out_dim (BN and ReLU on the hidden layer only).

Both follow the network contract (backbone/network.py): `forward(x)` returns the backbone's features, and
"logits" over no class, since a pretraining network has no classifier (`expand_head` adds none).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from backbone.network import Network
from utils.modes import train_mode
from utils.precision import upcast


def _linear_bn(d_in: int, d_out: int, relu: bool = True, affine: bool = True) -> list[nn.Module]:
    layers = [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out, affine=affine)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class _Pretraining(Network):
    """A backbone and the heads of a self-supervised objective: features, and no classifier."""

    @property
    def n_classes(self) -> int:
        return 0

    def expand_head(self, n_classes: int) -> None:
        """Nothing to grow: the class-mean report of pretraining lives in the method."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {"features": features, "logits": features.new_zeros(len(x), 0)}


class SimSiamNet(_Pretraining):
    def __init__(self, backbone: nn.Module, out_dim: int = 2048, pred_dim: int = 512, proj_layers: int = 3):
        super().__init__(backbone)
        dim = backbone.feature_dim
        layers = []
        for i in range(proj_layers):
            last = i == proj_layers - 1
            layers += _linear_bn(dim if i == 0 else out_dim, out_dim, relu=not last, affine=not last)
        self.projector = nn.Sequential(*layers)
        self.predictor = nn.Sequential(*_linear_bn(out_dim, pred_dim), nn.Linear(pred_dim, out_dim))

    def project_predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, p): the projection of x and the predictor's output on it."""
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)


class MoCoNet(_Pretraining):
    def __init__(self, backbone: nn.Module, out_dim: int = 128, K: int = 65536, head_bn: bool = False):
        super().__init__(backbone)
        dim = backbone.feature_dim
        hidden = [nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim)] if head_bn else [nn.Linear(dim, dim)]
        self.head = nn.Sequential(*hidden, nn.ReLU(inplace=True), nn.Linear(dim, out_dim))
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(K, out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(upcast(self.head(self.backbone(x))), dim=1)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for every parameter (BN statistics are the key encoder's own)."""
        for online, key in ((self.backbone, self.key_backbone), (self.head, self.key_head)):
            for q, k in zip(online.parameters(), key.parameters()):
                k.mul_(m).add_(q.detach(), alpha=1 - m)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, splits: int) -> torch.Tensor:
        """L2-normalised keys of x from the key encoder in train mode, with MoCo's shuffling BN simulated on one
        device: the batch is permuted and encoded in `splits` sub-batches, each normalised by its own statistics,
        so that a query and its key are not normalised by the same batch statistics. The permutation uses the
        global RNG (part of training's random stream, saved in checkpoints)."""
        with train_mode(self.key_backbone), train_mode(self.key_head):
            order = torch.randperm(len(x), device=x.device)
            chunks = [self.key_head(self.key_backbone(c)) for c in x[order].chunk(max(1, min(splits, len(x))))]
            keys = torch.empty_like(torch.cat(chunks))
            keys[order] = torch.cat(chunks)
        return F.normalize(upcast(keys), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries of the queue by `keys` (first in, first out; wraps around)."""
        K, ptr = len(self.queue), int(self.queue_ptr)
        keys = keys[-K:].to(self.queue.dtype)
        slots = (ptr + torch.arange(len(keys), device=self.queue.device)) % K
        self.queue[slots] = keys
        self.queue_ptr.fill_((ptr + len(keys)) % K)
