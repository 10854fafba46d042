"""RanPAC: Random Projections and Pre-trained Models for Continual Learning (McDonnell, Gong, Parvaneh, Abbasnejad,
van den Hengel; NeurIPS 2023, arXiv 2307.02251).

Idea: class prototypes of frozen pretrained features are correlated between classes, and a nearest-prototype rule
suffers from it. Project the features through a frozen random matrix into a much wider space with a non-linearity,
where classes become more linearly separable, and replace the prototypes by the ridge-regression classifier,
which decorrelates them through the inverse Gram matrix. Its sufficient statistics are sums over samples, so they
accumulate task after task and the classifier is exactly the one that all data seen so far would give; nothing is
ever trained by gradient after the optional first-session adaptation (Phase 1, as APER's, `first_session`):

    h(x) = ReLU(f(x) W_rand)                      W_rand (D x M), entries N(0, 1), drawn once, frozen
    G <- G + sum_{x in D_t} h(x) h(x)^T           (M x M)        C <- C + sum_{x in D_t} h(x) y(x)^T   (M x classes)
    W_o = (G + lambda I)^{-1} C                   scores(x) = h(x) W_o

lambda is chosen after each task from `ridge_grid` (10^-8 .. 10^8, the authors') on the task's own data: the
classifier fitted on the statistics of 80% of its samples, lambda minimising the mean squared error of the one-hot
targets on the other 20% (`ridge_holdout`). G, C, the solve and the choice are in float64.

M (`rp_dim`): 10000 in the paper and in options/ranpac/{cifar100,imagenet_r}.yaml (G is then 800 MB in float64, and
is part of every checkpoint); smaller in the digits and CPU configs, where the features are far narrower (said
in each config).

Deviations:
- The held-out 20% is a seeded stratified draw of the task's samples (`random_state` from the run's seed and the
  task). The authors' code takes the last 20% of the task's samples in loader order, which is grouped by class,
  so its held-out part can hold a single class.
- Phase 1 uses this framework's adapters (backbone/adapted.py: AdaptFormer on ViTs, as APER; ACL's residual
  adapters on CNNs) where the paper also uses SSF or VPT; with `first_session: false` the pretrained features are
  used as they are (the paper's "no PETL" rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

from backbone.adapted import AdaptedNet, RandomProjectionRidge
from methods import register_method
from methods.multi_steps.aper import APER, APERConfig
from utils.config import key
from utils.registry import InvalidState
from utils.types import Inference, Task


@dataclass(frozen=True)
class RanPACConfig(APERConfig):
    first_session: bool = key(True, "Phase 1: train adapters on the first task (as APER) and use the adapted "
                                    "network's features; false: the pretrained features as they are")
    rp_dim: int = key(10000, "M, the width of the random projection (the paper: 10000)", range="[1, inf)")
    ridge_grid: list[float] = key([10.0 ** k for k in range(-8, 9)], "the ridge values lambda is chosen from",
                                  range="(0, inf)")
    ridge_holdout: float = key(0.2, "the share of each task's training samples lambda is chosen on",
                               range="(0, 1)")


@register_method("ranpac", config=RanPACConfig)
class RanPAC(APER):
    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        self.register_buffer("gram", torch.zeros(cfg.rp_dim, cfg.rp_dim, dtype=torch.float64))
        self.register_buffer("class_sums", torch.zeros(cfg.rp_dim, 0, dtype=torch.float64))
        self.ridges: list[float] = []  # the lambda chosen after each task

    @property
    def use(self) -> str:
        return "adapted" if self.cfg.first_session else "pretrained"

    def build_network(self):
        layer_names = self.cfg.layer_names if self.cfg.first_session else ()
        return AdaptedNet(self.make_backbone(), self.make_head, self.use, layer_names, self.data.img_size,
                          self.cfg.adapter_bottleneck)

    def make_head(self, width: int):
        return RandomProjectionRidge(width, self.cfg.rp_dim)

    def stages(self, task, new_data, infer):
        return super().stages(task, new_data, infer) if self.cfg.first_session else []

    def before_task(self, task: Task) -> None:
        """C gets a zero column per new class."""
        extra = self.class_sums.new_zeros(self.cfg.rp_dim, task.total - self.class_sums.shape[1])
        self.class_sums = torch.cat([self.class_sums, extra], 1)

    @torch.no_grad()
    def after_task(self, task: Task, infer: Inference) -> None:
        """Accumulate G and C over the task's samples, choose lambda on them, solve for W_o."""
        features, labels = self.class_features(task, infer)
        h = self.network.head.hidden(features.to(self.gram.device).double())  # float64 throughout
        y = F.one_hot(labels.to(h.device), task.total).double()
        self.gram += h.T @ h
        self.class_sums += h.T @ y
        ridge = self.choose_ridge(h, y, task)
        self.ridges.append(ridge)
        weights = ridge_solve(self.gram, self.class_sums, ridge)  # (M, classes)
        head = self.network.head
        head.weight[: task.total] = weights.T.to(head.weight)

    def choose_ridge(self, h: torch.Tensor, y: torch.Tensor, task: Task) -> float:
        """The lambda of `ridge_grid` whose classifier, fitted on the statistics of a stratified (1 - holdout) part of
        the task's samples, has the smallest mean squared error on the rest."""
        labels = y.argmax(1).cpu().numpy()
        fit, held = train_test_split(range(len(labels)), test_size=self.cfg.ridge_holdout, stratify=labels,
                                     random_state=self.data.seed * 1000 + task.index)
        gram, sums = h[fit].T @ h[fit], h[fit].T @ y[fit]
        errors = [float(F.mse_loss(h[held] @ ridge_solve(gram, sums, r), y[held])) for r in self.cfg.ridge_grid]
        return self.cfg.ridge_grid[min(range(len(errors)), key=errors.__getitem__)]

    def extra_state(self) -> dict:
        return {**super().extra_state(), "ridges": list(self.ridges)}

    def load_extra_state(self, state: dict, seen: int | None = None) -> None:
        super().load_extra_state(state, seen)
        ridges = state["ridges"]
        if not isinstance(ridges, list) or not all(isinstance(r, float) and r in self.cfg.ridge_grid for r in ridges):
            raise InvalidState("'ridges' must list values of ridge_grid, one per finished task")
        self.ridges = list(ridges)


def ridge_solve(gram: torch.Tensor, sums: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + lambda I)^{-1} C, by a linear solve (not an inverse)."""
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, sums)
