"""Prompts for a `PromptedViT` (backbone/vit.py).

A prompt for one block is a prefix of L key tokens and L value tokens, stored as (2, L, D); a module hands the
ViT a dict {block index: (B, 2, L', D)} (see `PromptedViT.forward`).

- `PromptPool`: `size` prompts, each with a prefix in every block of `layers` and (optionally) a learnable key
  matched by cosine similarity to the query (L2P's pool, DualPrompt's E-prompts; a one-prompt pool without keys
  is DualPrompt's G-prompt). Selected prompts are concatenated along the token axis.
- `CodaComponents`: CODA-Prompt's components, combined per block with weights given by attention on the query;
  components are added in slices (one per task) orthogonal to the existing ones, which are frozen.

Prompts and keys start uniform in [-1, 1] (as the L2P/DualPrompt code does); CODA components start orthonormal.
Key matching and CODA's attention weights are computed in float32 under autocast (`full_precision`): a
bfloat16 cosine picks other keys than the float32 one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from utils.losses import orthogonality_penalty
from utils.precision import full_precision
from utils.registry import UserError


class PromptPool(nn.Module):
    def __init__(self, size: int, length: int, layers: list[int], dim: int, keyed: bool = True):
        super().__init__()
        if length < 0:
            raise UserError(f"prompt lengths must not be negative, got {length}")
        self.layers = list(layers)
        self.prompts = nn.Parameter(torch.empty(size, len(self.layers), 2, length, dim).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(size, dim).uniform_(-1, 1)) if keyed else None

    @full_precision
    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """(B, size) cosine similarity of each query to each key."""
        return F.normalize(query, dim=1) @ F.normalize(self.keys, dim=1).T

    def match(self, query: torch.Tensor, k: int, among: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best keys of each query, among the first `among` keys (default all): (B, k) indices and
        their cosine similarities (with a graph to the keys, for the key-matching loss)."""
        cos, idx = self.similarity(query)[:, :among].topk(k, dim=1)
        return idx, cos

    def forward(self, idx: torch.Tensor) -> dict[int, torch.Tensor]:
        """The prefixes of the prompts at (B, k) indices, concatenated: {block: (B, 2, k * L, D)}."""
        p = self.prompts[idx].permute(2, 0, 3, 1, 4, 5).flatten(3, 4)  # (layers, B, 2, k * L, D)
        return dict(zip(self.layers, p))


class CodaComponents(nn.Module):
    """Per block l, components with keys K_l, attention vectors A_l and prompts P_l (M of each); for a query q
    the prefix is sum_m alpha_m P_lm with alpha_m = cos(q * A_lm, K_lm)."""

    def __init__(self, length: int, layers: list[int], dim: int):
        super().__init__()
        self.length, self.layers, self.dim = length, list(layers), dim
        self.n_slices = 0  # slice t holds the parameters key_t, attention_t and prompt_t of shape (layers, n_t, ...)

    def add_components(self, n: int) -> None:
        """Freeze the existing components and add n new ones, orthonormal to the existing ones and each other."""
        self.requires_grad_(False)
        shapes = {"key": (self.dim,), "attention": (self.dim,), "prompt": (2, self.length, self.dim)}
        for name, shape in shapes.items():
            size = torch.Size(shape).numel()
            old = self._all(name).detach().flatten(2) if self.n_slices else torch.zeros(len(self.layers), 0, size)
            rows = _orthonormal_rows(old, n).reshape(len(self.layers), n, *shape)
            self.register_parameter(f"{name}_{self.n_slices}", nn.Parameter(rows))
        self.n_slices += 1

    def _all(self, name: str) -> torch.Tensor:
        return torch.cat([getattr(self, f"{name}_{t}") for t in range(self.n_slices)], dim=1)  # (layers, M, ...)

    @full_precision
    def forward(self, query: torch.Tensor) -> dict[int, torch.Tensor]:
        """The prefixes for (B, D) queries: {block: (B, 2, L, D)}, weighted in float32."""
        keys, attention, prompts = (self._all(n) for n in ("key", "attention", "prompt"))
        # cos(q * A_m, K_m) = (q . (A_m * K_m / |K_m|)) / |q * A_m|, without forming the (B, M, D) products
        dot = torch.einsum("bd,lmd->lbm", query, attention * F.normalize(keys, dim=-1))
        norm = torch.einsum("bd,lmd->lbm", query.square(), attention.square()).clamp_min(1e-12).sqrt()
        return dict(zip(self.layers, torch.einsum("lbm,lmtnd->lbtnd", dot / norm, prompts)))

    def orthogonality(self) -> torch.Tensor:
        """sum over blocks of `orthogonality_penalty` of K_l, A_l and the flattened P_l."""
        return sum(orthogonality_penalty(self._all(n).flatten(2)).sum() for n in ("key", "attention", "prompt"))


def concat_prefixes(*prefixes: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Merge {block: (B, 2, L, D)} dicts; prefixes for the same block are concatenated along the tokens."""
    merged: dict[int, torch.Tensor] = {}
    for part in prefixes:
        for block, prefix in part.items():
            merged[block] = torch.cat([merged[block], prefix], dim=2) if block in merged else prefix
    return merged


def _orthonormal_rows(old: torch.Tensor, n: int) -> torch.Tensor:
    """(layers, n, F) rows, orthonormal and orthogonal to the (layers, M, F) rows of `old` (QR = Gram-Schmidt)."""
    fresh = torch.randn(old.shape[0], n, old.shape[2], device=old.device)
    q = torch.linalg.qr(torch.cat([old, fresh], dim=1).transpose(1, 2))[0]  # (layers, F, M + n)
    return q[:, :, old.shape[1]:].transpose(1, 2).contiguous()
