"""UCIR / LUCIR: Learning a Unified Classifier Incrementally via Rebalancing (Hou, Pan, Loy, Wang, Lin; CVPR 2019).

Idea: the imbalance between many new-class samples and few exemplars biases a linear classifier towards the new
classes. LUCIR removes the bias in three ways. A cosine classifier (scores σ·cos(θ_c, f(x)), σ learned; the
backbone has no final ReLU) makes old and new weights comparable in magnitude. The less-forget constraint keeps
the new features close to the previous model's, λ·(1 − cos(f(x), f_old(x))) with λ = lambda_base·sqrt(old/new)
(the original's formula: stronger as old classes outnumber new ones), while the old class weights are frozen.
A margin-ranking loss separates each old-class exemplar's true class from its K most similar new classes:
Σ_k max(0, m − cos(θ_y, f) + cos(θ_k, f)). Optionally, class-balanced fine-tuning (CBF) then retrains the
classifier on a balanced subset. NME over herded exemplars is reported beside the CNN.

Deviations from the paper or the original code, and why:
- CBF (`epochs_finetune` > 0; off by default, as the original has none) trains the classifier alone, every
  class and σ, with the feature extractor and its BN statistics frozen, by CE on the memory as it will be after
  the task (m exemplars per old class plus m herded samples per new class); its schedule is multi_step with
  `milestones_finetune`, or cosine when none are given.
- New-class weights start random; the authors' optional imprinting of class-mean features is not done.
- σ is learned as exp(log σ), so it stays positive; cosines are computed in float32 under mixed precision;
  the ranking loss is the mean over (old sample, k) pairs.
- A replay memory is required (the ranking loss needs old-class exemplars).
PODNet (methods/multi_steps/podnet.py) extends this lifecycle with its own classifier and losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from backbone.cosine_linear import CosineIncrementalNet, feature_distillation
from methods import register_method
from methods.base import Method
from backbone.incremental_net import frozen_copy
from utils.config import key
from utils.registry import UserError
from utils.train_loop import OptimConfig


@dataclass
class BalancedFinetuneConfig:
    """Keys of the class-balanced classifier fine-tuning stage (UCIR's CBF, PODNet's balanced fine-tuning)."""

    epochs_finetune: int = key(0, "epochs of class-balanced classifier fine-tuning after each later task (0: off)")
    lrate_finetune: float = key(0.01, "learning rate of the class-balanced fine-tuning")
    milestones_finetune: list[int] = key([], "multi_step milestones of the fine-tuning (empty: cosine schedule)")


@dataclass
class UCIRConfig(BalancedFinetuneConfig):
    lambda_base: float = key(5.0, "less-forget weight: λ = lambda_base * sqrt(old classes / new classes)")
    K: int = key(2, "hard negatives per old-class sample: its K highest new-class scores")
    margin: float = key(0.5, "margin of the ranking loss, in cosine units")
    nb_proxy: int = key(1, "proxies per class of the cosine classifier")


@register_method("ucir", config=UCIRConfig)
class UCIR(Method):
    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        if self.memory is None:
            raise UserError(f"{cfg.method} replays exemplars: set memory_size > 0 (e.g. --memory_size 2000)")
        self.old_network = None
        self.balancing = False  # True during the class-balanced stage: classification loss only

    def build_network(self):
        return CosineIncrementalNet.from_config(self.cfg, self.cfg.nb_proxy)

    def before_task(self, task):
        self.old_network = None if task.is_first else frozen_copy(self.network)
        self.network.expand_head(task.total)  # old class weights frozen, a new part for the new classes

    def train_task(self, task, new_data, engine):
        super().train_task(task, new_data, engine)
        if not task.is_first and self.cfg.epochs_finetune > 0:
            self.balanced_finetune(task, engine)

    def training_step(self, x, y):
        out = self.network(x)
        losses = {"ce": self.seen_logits_ce(out["logits"], y)}
        if self.old_network is None or self.balancing:
            return losses
        known, new = self.task.known, self.task.total - self.task.known
        lam = self.cfg.lambda_base * math.sqrt(known / new)
        losses["less_forget"] = lam * feature_distillation(out["features"], self.old_network(x)["features"])
        losses["margin_ranking"] = margin_ranking_loss(out["cosine"], y, known, self.cfg.K, self.cfg.margin)
        return losses

    def balanced_finetune(self, task, engine) -> None:
        """Train the classifier alone (every class part and σ; the feature extractor and its BN statistics frozen)
        with the classification loss on a class-balanced set: the memory as it will be after this task, i.e. the
        old exemplars plus as many samples of each new class, chosen like the memory."""
        features_of = lambda dataset: engine.features(self.network, dataset)  # noqa: E731
        balanced = self.data.dataset("train", self.memory.balanced_indices(task, self.data, features_of))
        opt = OptimConfig.from_config(self.cfg, first_task=False).replace(
            epochs=self.cfg.epochs_finetune, lrate=self.cfg.lrate_finetune,
            milestones=tuple(self.cfg.milestones_finetune),
            scheduler="multi_step" if self.cfg.milestones_finetune else "cos")
        self.network.freeze_backbone()
        self.network.head.requires_grad_(True)
        self.balancing = True
        engine.fit(self, balanced, opt, stage="balanced")
        self.balancing = False
        self.network.freeze_backbone(self.cfg.freeze_fe)


def margin_ranking_loss(cosine: torch.Tensor, y: torch.Tensor, n_old: int, k: int, margin: float) -> torch.Tensor:
    """LUCIR's inter-class separation on σ-free scores: for every old-class sample (y < n_old),
    max(0, m − cos_y + cos_k) for each of its K highest new-class cosines cos_k; the mean over those
    (sample, k) pairs, 0 when the batch holds no old-class sample."""
    hard = cosine[:, n_old:].topk(min(k, cosine.shape[1] - n_old), dim=1).values
    terms = F.relu(margin - cosine.gather(1, y[:, None]) + hard)[y < n_old]
    return terms.sum() / max(terms.numel(), 1)
