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
- New-class weights are imprinted (`imprint: true`, as the authors' scripts run LUCIR, `--imprint_weights`): at
  the start of every later task, class c's weight is the normalised mean of the normalised features of c's
  training samples under the network of the previous task (an `Action` before the training stage). The first
  task's weights start random. With `imprint: false` every new class starts random.
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

from backbone.cosine_linear import CosineIncrementalNet
from methods import register_method
from methods.base import BalancedStageConfig, Method
from utils.config import key
from utils.losses import feature_distillation, margin_ranking_loss
from utils.precision import upcast
from utils.types import Action


@dataclass(frozen=True)
class UCIRConfig(BalancedStageConfig):
    lambda_base: float = key(5.0, "less-forget weight: λ = lambda_base * sqrt(old classes / new classes)",
                              range="[0, inf)")
    K: int = key(2, "hard negatives per old-class sample: its K highest new-class scores", range="[1, inf)")
    margin: float = key(0.5, "margin of the ranking loss, in cosine units", range="[0, inf)")
    nb_proxy: int = key(1, "proxies per class of the cosine classifier", range="[1, inf)")
    imprint: bool = key(True, "initialise each later task's class weights from the classes' normalised feature "
                              "means (imprinting); false: random")


@register_method("ucir", config=UCIRConfig)
class UCIR(Method):
    replay = "required"
    distills = True

    def build_network(self):
        return CosineIncrementalNet(self.make_backbone(), self.cfg.nb_proxy)

    def stages(self, task, new_data, infer):
        stages = super().stages(task, new_data, infer)
        if not task.is_first and self.cfg.imprint:
            stages = [Action("imprint", lambda: self.imprint(task, infer)), *stages]
        if task.is_first or self.cfg.epochs_finetune == 0:
            return stages
        return [*stages, self.balanced_stage("balanced", lambda: self.balanced_set(task, infer), self.balanced_step,
                                             lambda: [self.network.head])]

    def training_step(self, x, y):
        out = self.network(x)
        losses = self.classification(out, y)
        if self.old_network is None:
            return losses
        known, new = self.task.known, self.task.total - self.task.known
        lam = self.cfg.lambda_base * math.sqrt(known / new)
        losses["less_forget"] = lam * feature_distillation(out["features"], self.old_network(x)["features"])
        losses["margin_ranking"] = margin_ranking_loss(out["cosine"], y, known, self.cfg.K, self.cfg.margin)
        return losses

    def balanced_step(self, x, y):
        """The class-balanced stage: the classification loss alone, on the classifier (every class part and σ;
        the frozen feature extractor keeps its BN statistics)."""
        return self.classification(self.network(x), y)

    def imprint(self, task, infer) -> None:
        """Imprint the new classes' weights (the head's newest part) from the current network's features."""
        indices = self.data.indices("train", task.classes)
        features, _ = infer(self.network.features, self.data.dataset("train", indices, augment=False), self.network)
        features = F.normalize(upcast(features), dim=1)
        labels = torch.as_tensor(self.data.train_y[indices])
        self.network.head.imprint(torch.cat([self.class_proxies(features[labels == c], c) for c in task.classes]))

    def class_proxies(self, features: torch.Tensor, c: int) -> torch.Tensor:
        """(nb_proxy, D) imprinted proxies of class c from its normalised features: their normalised mean."""
        return F.normalize(features.mean(0), dim=0).expand(self.cfg.nb_proxy, -1)

    # ---- helpers ----
    def classification(self, out, y):
        return {"ce": self.ce(out["logits"], y)}

