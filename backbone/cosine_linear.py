"""Cosine classifiers and the incremental network built on them (LUCIR, PODNet), plus their distillation losses.

- `CosineClassifier`: scores σ·ŷ_c with ŷ_c the cosine between the feature and class c's weight (Hou et al.,
  CVPR 2019). With `nb_proxy` K > 1 it is PODNet's local-similarity classifier (Douillard et al., ECCV 2020):
  ŷ_c = Σ_k softmax_k(s_{c,k}) · s_{c,k} over the similarities s_{c,k} to the K proxies of class c. The
  similarity is the plain cosine (`similarity="cosine"`, the paper's, and UCIR's) or, with
  `similarity="distance"`, the negative squared Euclidean distance between the unit vectors, −‖f̂ − ŵ‖² =
  2·cos − 2, in [−4, 0] (the PODNet authors' code): the same class order for one proxy, but with K > 1 a
  softmax over the proxies at half the temperature, and scores twice as spread for the scale σ. σ is learned
  and positive: a negative σ flips every score (with PODNet's hinged NCA loss a raw σ crossed zero on a 2-class
  digits task and reached zero loss with wrong predictions). Unbounded, σ = exp(s); with `max_sigma` M,
  σ = M · sigmoid(s − log(M − 1)), which is 1 at s = 0, equals exp(s) to first order there and never exceeds M
  (PODNet: an unbounded σ went 1.5 → 26 → 11 over three digits tasks, and every jump shifted the NCA margin's
  weight against the similarities).
  The class weights are kept as one part per task, so a task's part is a separate parameter, created when the
  head grows and frozen when the next task arrives.
- `CosineIncrementalNet`: a backbone plus that head, with the interface of `IncrementalNet`; its forward also
  returns the outputs of the backbone modules named in `layer_names`, taken with forward hooks (PODNet).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from backbone.network import Network
from utils.precision import upcast
from utils.registry import UserError, closest


#: how a feature is compared with a proxy: cosine, or the negative squared distance of the unit vectors
SIMILARITIES = ("cosine", "distance")


class CosineClassifier(nn.Module):
    def __init__(self, in_features: int, nb_proxy: int = 1, max_sigma: float | None = None,
                 similarity: str = "cosine"):
        super().__init__()
        if max_sigma is not None and max_sigma <= 1:
            raise UserError(f"the bound of the learned scale must exceed its initial value 1, got {max_sigma}")
        if similarity not in SIMILARITIES:
            raise UserError(f"similarity must be one of {', '.join(SIMILARITIES)}, got '{similarity}'")
        self.in_features, self.nb_proxy, self.max_sigma = in_features, nb_proxy, max_sigma
        self.similarity = similarity
        self.parts = nn.ParameterList()  # one (classes of the task x nb_proxy, in_features) weight per task
        self.log_sigma = nn.Parameter(torch.zeros(1))  # s: σ = exp(s), or M · sigmoid(s − log(M − 1)); 1 at start

    @property
    def sigma(self) -> torch.Tensor:
        if self.max_sigma is None:
            return self.log_sigma.exp()
        return self.max_sigma * torch.sigmoid(self.log_sigma - math.log(self.max_sigma - 1))

    @property
    def out_features(self) -> int:
        return sum(len(p) for p in self.parts) // self.nb_proxy

    def add_classes(self, n: int) -> None:
        """A new part of n classes (weights U(-1/sqrt(d), 1/sqrt(d)), as nn.Linear); earlier parts are frozen."""
        self.parts.requires_grad_(False)
        bound = 1.0 / math.sqrt(self.in_features)
        device = self.log_sigma.device
        self.parts.append(nn.Parameter(torch.empty(n * self.nb_proxy, self.in_features, device=device)
                                       .uniform_(-bound, bound)))

    @torch.no_grad()
    def imprint(self, weight: torch.Tensor) -> None:
        """Set the newest part (classes x nb_proxy, in_features), e.g. to the new classes' normalised feature
        means (imprinting); only the directions matter to the cosines."""
        self.parts[-1].copy_(weight.reshape(self.parts[-1].shape))

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(B, classes) class similarities ŷ, in float32: in [-1, 1] with the cosine similarity (plain cosines
        when nb_proxy is 1), in [-4, 0] with the distance one (2·cos − 2 = −‖f̂ − ŵ‖²)."""
        with torch.autocast(features.device.type, enabled=False):
            weight = F.normalize(upcast(torch.cat(list(self.parts))), dim=1)
            similarities = F.linear(F.normalize(upcast(features), dim=1), weight)
        if self.similarity == "distance":
            similarities = 2 * similarities - 2
        if self.nb_proxy == 1:
            return similarities
        similarities = similarities.view(len(features), -1, self.nb_proxy)
        return (F.softmax(similarities, dim=2) * similarities).sum(2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosine(features)


class CosineIncrementalNet(Network):
    """forward(x) -> {"features", "maps" (the hooked outputs, in execution order), "cosine", "logits" = σ·cosine}."""

    def __init__(self, backbone: nn.Module, nb_proxy: int = 1, layer_names: list[str] | tuple = (),
                 max_sigma: float | None = None, similarity: str = "cosine"):
        super().__init__(backbone)
        self.head = CosineClassifier(self.feature_dim, nb_proxy, max_sigma, similarity)
        names = [n for n, _ in backbone.named_modules() if n]
        for name in layer_names:
            if name not in names:
                raise UserError(f"layer_names: the backbone has no module '{name}'{closest(name, names)}; "
                                f"top-level modules: {', '.join(n for n in names if '.' not in n)}")
        self.layer_names = list(layer_names)

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    def expand_head(self, n_classes: int) -> None:
        """Grow the head to `n_classes` classes with a new part; the parts of earlier tasks are frozen."""
        if n_classes > self.n_classes:
            self.head.add_classes(n_classes - self.n_classes)

    def forward(self, x: torch.Tensor) -> dict:
        maps: list[torch.Tensor] = []
        # hooks live only for this call, so deep copies of the network never write into another's list
        hooks = [self.backbone.get_submodule(name).register_forward_hook(lambda m, i, out: maps.append(out))
                 for name in self.layer_names]
        try:
            features = self.backbone(x)
        finally:
            for hook in hooks:
                hook.remove()
        cosine = self.head.cosine(features)
        return {"features": features, "maps": maps, "cosine": cosine, "logits": self.head.sigma * cosine}

