"""SimpleCIL (Zhou, Cai, Ye, Zhan, Liu; "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024, arXiv 2303.07338).

Idea: a pretrained network's features are already good enough to classify new classes without learning anything:
keep the network frozen, and after each task set the prototype of each new class to the mean of its training
samples' features; classify by cosine similarity to the prototypes. No gradient step, no memory, no forgetting of
the classifier (old prototypes never change):

    p_c = (1 / |D_c|) sum_{x in D_c} f(x)          (un-augmented training samples of class c)
    score_c(x) = cos(f(x), p_c),   prediction = argmax_c score_c(x) over the seen classes

The network (backbone/adapted.py `AdaptedNet`, `use: pretrained`) is the backbone and the prototypes; the engine
runs no stage (`stages` is empty), so the task's recorded training time is the feature pass over its data.

Deviations: none in the algorithm. The authors' code (PyCIL/LAMDA-PILOT `simplecil`) stores the prototypes in a
cosine linear layer with a learnable scale that is never trained; the scale does not change the argmax and is
left out. Class-incremental only (`incre_type: cil`; the method and its papers classify among every seen
class). The features come from `infer` (un-augmented images, eval mode) under the run's precision; the cosine
is computed in float32.
"""
from __future__ import annotations

import torch

from backbone.adapted import AdaptedNet, CosinePrototypes
from methods import register_method
from methods.base import Method
from utils.registry import UserError
from utils.types import Inference, Task


@register_method("simplecil")
class SimpleCIL(Method):
    replay = "none"
    use = "pretrained"  # what the prototypes are means of (APER: "both")

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        if cfg.incre_type != "cil":
            raise UserError(f"{cfg.method} classifies among every seen class (incre_type: cil)")

    def build_network(self):
        return AdaptedNet(self.make_backbone(), self.make_head, self.use, img_size=self.data.img_size)

    def make_head(self, width: int):
        """The closed-form classifier over features of `width` dimensions."""
        return CosinePrototypes(width)

    def stages(self, task, new_data, infer):
        """Nothing trains: the engine runs no stage."""
        return []

    def after_task(self, task: Task, infer: Inference) -> None:
        """The prototypes of the task's classes: the mean feature of each class's un-augmented training samples."""
        features, labels = self.class_features(task, infer)
        self.set_prototypes(features, labels, task)

    def class_features(self, task: Task, infer: Inference) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (float32) and labels of the task's un-augmented training samples."""
        dataset = self.data.dataset("train", self.data.indices("train", task.classes), augment=False)
        features, labels = infer(self.network.features, dataset, self)
        return features.float(), labels

    @torch.no_grad()
    def set_prototypes(self, features: torch.Tensor, labels: torch.Tensor, task: Task) -> None:
        """p_c = the mean of class c's features, for the task's classes (summed in float64)."""
        rows = labels - task.known
        sums = torch.zeros(task.total - task.known, features.shape[1], dtype=torch.float64)
        sums.index_add_(0, rows, features.double())
        counts = torch.bincount(rows, minlength=len(sums)).clamp(min=1)
        weight = self.network.head.weight
        weight[task.known: task.total] = (sums / counts[:, None]).to(weight)

    def predict(self, x):
        return {"cnn": self.network(x)["logits"][:, : self.task.total]}
