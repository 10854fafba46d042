"""The network of the methods that classify a frozen pretrained network's features without training a classifier
by gradient (SimpleCIL, APER, RanPAC): the backbone, always frozen; optionally one set of adapters, trained on the
first task only (APER; RanPAC's first-session adaptation); and a head whose rows the method sets in closed form.

Adapters, when `layer_names` is given:
- on a CNN, the residual adapters of backbone/adapters.py (ACL's) before each module of `layer_names`;
- on a timm ViT (`layer_names: [blocks]`), AdaptFormer's parallel bottleneck beside every block's MLP (Chen et al.,
  NeurIPS 2022), as APER uses it:

      x <- x + attn(norm1(x));   x <- x + mlp(norm2(x)) + s * up(ReLU(down(x)))     down: D -> r, up: r -> D, s = 0.1

  with `up` zero at the start, so that before training the adapted network is the pretrained one.

`features(x)` is what the head classifies, chosen by `use`: "pretrained" (the backbone alone), "adapted" (the
backbone with its adapters) or "both" (their concatenation [pretrained, adapted]: APER's two networks, which share
the frozen weights here and differ by the adapters). `adapted_logits(x)` is the first task's training path: a
cosine classifier with a learnt scale `fc` (backbone/cosine_linear.py, as the authors' training head) on the adapted
features, which prediction never uses.

Heads (their weights are frozen parameters, so that the parameter count of prediction includes them):
- `CosinePrototypes`: score_c = cos(f, p_c), one prototype row per class (SimpleCIL, APER);
- `RandomProjectionRidge`: scores = ReLU(f W_rand) W_o^T, W_rand (D x M) drawn once from N(0, 1), W_o (C x M) the
  ridge solution (RanPAC).
A new task's rows start at zero (a zero prototype scores 0); the method fills them after the task.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from backbone.adapters import Adapter, probe_channels
from backbone.cosine_linear import CosineClassifier
from backbone.network import Network
from backbone.vit import resized
from utils.precision import full_precision
from utils.registry import UserError

USES = ("pretrained", "adapted", "both")


def _grown(weight: torch.Tensor, rows: int) -> nn.Parameter:
    """`weight` with zero rows appended up to `rows`, as a frozen parameter."""
    extra = weight.new_zeros(rows - len(weight), *weight.shape[1:])
    return nn.Parameter(torch.cat([weight.detach(), extra]), requires_grad=False)


class _RowsPerClass(nn.Module):
    """A head whose frozen `weight` holds one row per class; `expand` appends zero rows."""

    def expand(self, n_classes: int) -> None:
        if n_classes > len(self.weight):
            self.weight = _grown(self.weight, n_classes)


class CosinePrototypes(_RowsPerClass):
    """score_c = <f, p_c> / (|f| |p_c|) over one prototype p_c per class (float32 under any autocast)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(0, dim), requires_grad=False)

    @full_precision
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T


class RandomProjectionRidge(_RowsPerClass):
    """scores = h W_o^T with h = ReLU(f W_rand): a frozen random projection of the D features to M dimensions, then
    the ridge-regression weights W_o (float32 under any autocast)."""

    def __init__(self, dim: int, M: int):
        super().__init__()
        self.projection = nn.Parameter(torch.randn(dim, M), requires_grad=False)
        self.weight = nn.Parameter(torch.zeros(0, M), requires_grad=False)

    @full_precision
    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(features @ self.projection.to(features.dtype))

    @full_precision
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.hidden(features) @ self.weight.to(features.dtype).T


class ParallelAdapter(nn.Module):
    """s * up(ReLU(down(x))) on D-dimensional tokens, `up` zero at the start (AdaptFormer)."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1):
        super().__init__()
        self.down, self.up, self.scale = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim), scale
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(x)))


class AdaptedBlock(nn.Module):
    """A timm ViT block with a `ParallelAdapter` beside its MLP, added only while `enabled`."""

    def __init__(self, block: nn.Module, adapter: ParallelAdapter):
        super().__init__()
        self.block, self.adapter, self.enabled = block, adapter, False

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), **kwargs)))
        out = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        return out + self.adapter(x) if self.enabled else out


class AdaptedNet(Network):
    """A frozen backbone, optional first-task adapters (`layer_names`; [] for none), a closed-form head over
    `features(x)` (chosen by `use`; `head(width)` builds it) and the adapters' training head `fc`."""

    def __init__(self, backbone: nn.Module, head: Callable[[int], nn.Module], use: str = "pretrained", layer_names=(),
                 img_size: int = 32, bottleneck: int = 64):
        super().__init__(backbone)
        if use not in USES:
            raise ValueError(f"use must be one of {USES}, got {use!r}")
        if use != "pretrained" and not layer_names:
            raise UserError(f"features of the adapted network ({use}) need adapters: set layer_names")
        self.use = use
        self.head = head(self.feature_dim)  # over the features of `use`
        self.adapters = nn.ModuleList()
        self._adapting, self._blocks = False, []  # the ViT's AdaptedBlocks
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(backbone, VisionTransformer):  # a timm ViT takes the run's image size
            resized(backbone, img_size)
        layer_names = list(layer_names)
        if layer_names == ["blocks"]:
            self._add_vit_adapters(img_size, bottleneck)
        elif layer_names:
            for name, channels in zip(layer_names, probe_channels(backbone, layer_names, img_size)):
                self.adapters.append(Adapter(channels))
                backbone.get_submodule(name).register_forward_pre_hook(self._hook(len(self.adapters) - 1))
        self.fc = CosineClassifier(backbone.feature_dim) if len(self.adapters) else None
        self.freeze_backbone()

    def _add_vit_adapters(self, img_size: int, bottleneck: int) -> None:
        from timm.models.vision_transformer import Block, VisionTransformer

        vit = self.backbone
        if not isinstance(vit, VisionTransformer) or not all(type(b) is Block for b in vit.blocks):
            raise UserError(f"layer_names: [blocks] puts parallel adapters in a timm VisionTransformer's blocks; "
                            f"backbone {type(vit).__name__} is not one (on a CNN, name the modules to adapt)")
        for i, block in enumerate(vit.blocks):
            self.adapters.append(ParallelAdapter(vit.embed_dim, bottleneck))
            vit.blocks[i] = AdaptedBlock(block, self.adapters[-1])
            self._blocks.append(vit.blocks[i])

    def _hook(self, point: int):
        def hook(module, args):
            return (self.adapters[point](args[0]), *args[1:]) if self._adapting else None

        return hook

    @property
    def n_classes(self) -> int:
        return len(self.head.weight)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim * (2 if self.use == "both" else 1)

    def expand_head(self, n_classes: int) -> None:
        """The head's rows for classes [0, n_classes) (new ones zero) and, with adapters, the training head's."""
        if n_classes <= self.n_classes:
            return
        self.head.expand(n_classes)
        if self.fc is not None:
            self.fc.add_classes(n_classes - self.fc.out_features)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """The backbone is frozen from the start (the adapters are what may learn)."""
        super().freeze_backbone(frozen)

    def run(self, x: torch.Tensor, adapted: bool) -> torch.Tensor:
        """The backbone's features with or without the adapters."""
        self._set_adapting(adapted)
        try:
            return self.backbone(x)
        finally:
            self._set_adapting(False)

    def _set_adapting(self, on: bool) -> None:
        self._adapting = on
        for block in self._blocks:
            block.enabled = on

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.use == "both":
            return torch.cat([self.run(x, False), self.run(x, True)], 1)
        return self.run(x, self.use == "adapted")

    def adapted_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The first task's training path: the training head on the adapted features."""
        return self.fc(self.run(x, True))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(x)
        return {"features": features, "logits": self.head(features)}
