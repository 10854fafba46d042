"""A frozen timm Vision Transformer that takes prefix key/value prompts in chosen blocks (prefix-tuning).

`PromptedViT` runs timm's own modules (patch embedding, position embedding, and each block's norms, qkv and
output projections, MLP, layer scale) and changes one thing: in a block given a prefix `(B, 2, L, D)`, the L
prompt keys and L prompt values are prepended to the block's keys and values (Li & Liang 2021; the form used by
DualPrompt and CODA-Prompt), so the tokens attend to the prompts and the sequence length stays the same.
Without prefixes the output equals timm's `forward_features` + `forward_head(pre_logits=True)`: the [CLS]
feature for the usual `global_pool='token'`.

Attention runs through `F.scaled_dot_product_attention`, except while tracing (fvcore), where it is written as
two matrix products so that the attention FLOPs, prompt tokens included, are counted (fvcore skips SDPA).

The ViT honours the run's img_size (a multiple of the patch size): `timm_backbone` builds the model at its native
size and loads weights from `pretrain_path` or an existing cache (else a `UserError`), then timm's
`set_input_size` resamples the position embedding. The patch size stays the model's own: with random weights
(digits, tests) fewer, larger patches even give better frozen features (linear probe on digits, vit_tiny at
32 px: 94% with 16 px patches, 75% with 8 px patches).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from backbone.incremental_net import IncrementalNet
from backbone.timm_models import is_timm_model, timm_backbone
from utils.registry import UserError


def resized(vit: nn.Module, img_size: int) -> nn.Module:
    """A timm ViT made to take img_size x img_size images (its position embedding resampled); img_size must be a
    multiple of its patch size."""
    patch = vit.patch_embed.patch_size[0]
    if img_size % patch:
        raise UserError(f"img_size ({img_size}) must be a multiple of the ViT's patch size ({patch})")
    vit.set_input_size(img_size=img_size)
    return vit


class PromptedViT(nn.Module):
    """A frozen timm ViT: `forward(x, prefixes)` -> (B, D) features, `query(x)` -> prompt-free features."""

    def __init__(self, vit: nn.Module, img_size: int):
        super().__init__()
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer

        if not isinstance(vit, VisionTransformer) or not all(
                type(b) is Block and type(b.attn) is Attention for b in vit.blocks):
            raise UserError(f"prompt methods need a plain timm VisionTransformer (pre-norm blocks with qkv "
                            f"attention), got {type(vit).__name__}; use e.g. backbone: vit_base_patch16_224")
        self.vit = resized(vit, img_size).requires_grad_(False)
        self.feature_dim = self.embed_dim = vit.embed_dim
        self.depth = len(vit.blocks)

    def check_layers(self, name: str, layers: list[int]) -> list[int]:
        """`layers` as given, after checking that they are distinct block indices of this ViT."""
        if any(not 0 <= i < self.depth for i in layers) or len(set(layers)) != len(layers):
            raise UserError(f"{name} must list distinct block indices in [0, {self.depth - 1}] (the ViT has "
                            f"{self.depth} blocks), got {layers}")
        return list(layers)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen, prompt-free [CLS] feature that prompts are selected by (no autograd graph)."""
        return self(x)

    def forward(self, x: torch.Tensor, prefixes: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        vit, prefixes = self.vit, prefixes or {}
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for i, block in enumerate(vit.blocks):
            x = x + block.drop_path1(block.ls1(_attention(block.attn, block.norm1(x), prefixes.get(i))))
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return vit.forward_head(vit.norm(x), pre_logits=True)


def _attention(attn: nn.Module, x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """timm's `Attention.forward` with the prefix's keys and values (B, 2, L, D) prepended to the tokens'."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix is not None:  # (B, 2, L, D) -> keys and values of shape (B, heads, L, head_dim)
        pk, pv = prefix.to(k.dtype).reshape(B, 2, -1, attn.num_heads, attn.head_dim).permute(1, 0, 3, 2, 4).unbind(0)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if torch.jit.is_tracing():  # explicit products, so that fvcore counts them
        out = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def prompted_vit_net(name: str, pretrained: bool, pretrain_path: str | None, img_size: int) -> IncrementalNet:
    """The network of a prompt method: the `PromptedViT` of timm model `name` at `img_size`, always frozen
    (whatever `freeze_fe` says), plus the growing linear head; only prompts and head train."""
    if not is_timm_model(name):
        raise UserError(f"backbone '{name}' is not a timm model; prompt methods need a timm ViT such as "
                        "vit_base_patch16_224")
    network = IncrementalNet(PromptedViT(timm_backbone(name, pretrained, pretrain_path), img_size))
    network.freeze_backbone()
    return network
