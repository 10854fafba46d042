"""PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning (Douillard, Cord, Ollion, Robert,
Valle; ECCV 2020).

Idea: distil the previous model through pooled statistics of intermediate feature maps, which constrain the
representation less than the maps themselves. POD-spatial pools each hooked map h (C x H x W; squared) over
the height and over the width, concatenates and L2-normalises the two, and penalises the distance to the old
model's, averaged over the layers; POD-flat keeps the final embedding close to the old one. Both are scaled by
sqrt(seen / new classes). Classification uses a local-similarity classifier (LSC): `nb_proxy` proxies per class
combined by a softmax over their cosines, trained with an NCA loss that subtracts a margin δ from the true
class only: [−log(exp(ηŷ_y − δ) / Σ_{c≠y} exp(ηŷ_c))]₊, η learned. After each later task the classifier
is fine-tuned on a class-balanced set of exemplars. Exemplars are herded; NME is reported beside the CNN.
PODNet builds on LUCIR, and so does this file: it keeps UCIR's lifecycle (methods/multi_steps/ucir.py) and
replaces the classifier and the losses.

Deviations from the original code (which are defects there), and choices, with the reason:
- POD-flat is weighted by `lambda_f_base` and POD-spatial by `lambda_c_base` (the original used λ_c for both and
  ignored λ_f); the NCA margin is subtracted from the positive similarity only, as in the paper (the original
  subtracted it from every class).
- The margin is subtracted from the scaled score ηŷ_y, as the original applies NCA to the classifier's logits;
  the paper writes η(ŷ_y − δ), under which the learned η shrinks to 0 while the margin is unmet
  (∂L/∂η = E[ŷ_negatives] − (ŷ_y − δ) > 0), which we saw on digits (accuracy 25% after five tasks).
- POD-flat is 1 − cos(h, h_old) on the final embedding, as in the original and the authors' code.
- Balanced fine-tuning trains the classifier alone (every class's proxies and η; the feature extractor and its
  BN statistics frozen) with the NCA loss, since its purpose is to rebalance the classes and a set of m samples
  per class is too small to train the extractor on (the original fine-tuned every parameter). Its schedule is
  multi_step with `milestones_finetune` (ignored by the original), or cosine when none are given.
- During the main stage the proxies of old classes are frozen, as in the original; new proxies start random
  (no imprinting). η is learned as exp(log η), so it stays positive. Cosines are computed in float32 under
  mixed precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from methods import register_method
from methods.base import BalancedStageConfig
from methods.multi_steps.ucir import UCIR
from utils.config import key
from utils.losses import feature_distillation, nca_loss, pod_spatial, restrict_logits
from utils.registry import UserError


@dataclass
class PODNetConfig(BalancedStageConfig):
    epochs_finetune: int = 20
    lrate_finetune: float = 0.05
    lambda_c_base: float = key(5.0, "POD-spatial weight, times sqrt(seen / new classes)", range="[0, inf)")
    lambda_f_base: float = key(1.0, "POD-flat weight, times sqrt(seen / new classes)", range="[0, inf)")
    nb_proxy: int = key(10, "proxies per class of the local-similarity classifier", range="[1, inf)")
    nca_margin: float = key(0.6, "NCA margin δ subtracted from the true class's similarity", range="[0, inf)")
    layer_names: list[str] = key(["stage_1", "stage_2", "stage_3"],
                                 "backbone modules whose outputs POD-spatial distils (resnet18: layer1 ...)")


@register_method("podnet", config=PODNetConfig)
class PODNet(UCIR):
    """LUCIR's lifecycle (replay memory, frozen previous network, old classes frozen, balanced classifier stage)
    with PODNet's classifier and losses."""

    def build_network(self):
        if not self.cfg.layer_names:
            raise UserError("podnet: layer_names must name the backbone modules that POD-spatial distils, "
                            "e.g. [stage_1, stage_2, stage_3] (resnet32) or [layer1, layer2, layer3] (resnet18)")
        return self.cosine_network(self.cfg.layer_names)

    def training_step(self, x, y):
        out = self.network(x)
        losses = self.classification(out, y)
        if self.old_network is None:
            return losses
        old = self.old_network(x)
        factor = math.sqrt(self.task.total / (self.task.total - self.task.known))
        losses["pod_flat"] = self.cfg.lambda_f_base * factor * feature_distillation(out["features"], old["features"])
        losses["pod_spatial"] = self.cfg.lambda_c_base * factor * pod_spatial(out["maps"], old["maps"])
        return losses

    def classification(self, out, y):
        return {"nca": nca_loss(*restrict_logits(out["logits"], y, *self.class_bounds(y)), self.cfg.nca_margin)}
