"""The Method base class: the lifecycle hooks the runner calls for each task, with sensible defaults.

Per task the runner calls: `before_task` -> `train_task` (default: the shared `Engine.fit` on `train_data`)
-> `after_task` -> evaluation through `predict`. A subclass implements `training_step` and overrides only
the hooks its algorithm needs. Task state lives in `self.task`; no method writes a batch loop.

Rules that make every method checkpointable and resumable (a run is restored by building the method, replaying
`before_task` for every task reached, then `load_state_dict`):
- modules are created in `__init__` or `before_task` only, deterministically from the config and the task
  (e.g. the frozen copy of the previous network is made at the start of the next task, not at the end of one);
- all state is module parameters/buffers, or plain tensors/numbers/lists/dicts returned by `extra_state`
  (buffers may change shape between tasks: loading resizes them);
- code in `train_task` between two `engine.fit` calls builds data and freezes/unfreezes only; weight changes
  belong to a stage (`fit`), `before_task` or `after_task`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset

from backbone import build_backbone
from backbone.incremental_net import IncrementalNet
from utils.data_manager import Task
from utils.memory import ExemplarMemory
from utils.registry import UserError
from utils.train_loop import Engine, OptimConfig


class Method(nn.Module):
    #: the prediction key whose accuracy is the method's result ("cnn", or "nme" for iCaRL)
    record = "cnn"

    def __init__(self, cfg, data):
        super().__init__()
        self.cfg, self.data = cfg, data
        self.task: Task | None = None
        self.network = self.build_network()
        self.memory = ExemplarMemory.from_config(cfg, data.n_classes, data.seed)
        if cfg.apply_nme and self.memory is None:
            raise UserError("apply_nme: true needs a replay memory (memory_size > 0)")
        self.register_buffer("class_means", torch.zeros(0), persistent=True)

    def build_network(self) -> nn.Module:
        network = IncrementalNet(build_backbone(self.cfg.backbone, self.cfg.pretrained, self.cfg.pretrain_path))
        if self.cfg.freeze_fe:
            network.freeze_backbone()
        return network

    # ---- lifecycle, in the order the runner calls it ----
    def before_task(self, task: Task) -> None:
        self.network.expand_head(task.total)

    def train_data(self, task: Task, new_data):
        """New-class data, plus the replay memory when there is one."""
        if self.memory is None or len(self.memory) == 0:
            return new_data
        return ConcatDataset([new_data, self.data.dataset("train", self.memory.indices())])

    def train_task(self, task: Task, new_data, engine: Engine) -> None:
        engine.fit(self, self.train_data(task, new_data), OptimConfig.from_config(self.cfg, task.is_first))

    def parameters_to_optimize(self):
        return self.network.parameters()

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called between backward and the optimiser step (gradient projection, clipping)."""

    def after_task(self, task: Task, engine: Engine) -> None:
        """Update the memory for the new classes and, with apply_nme, the class means."""
        if self.memory is not None:
            features_of = lambda dataset: engine.features(self.network, dataset)  # noqa: E731
            self.memory.update(task.classes, task.total, self.data, features_of)
            if self.cfg.apply_nme:
                self.class_means = self.memory.class_means(self.data, features_of).to(self.class_means.device)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores over the seen classes per classifier: "cnn" logits, and "nme" (negative distance to the
        class means) when apply_nme. A method that routes samples to tasks adds "task_id": the (B,) task index
        it picked, reported as task-id accuracy."""
        out = self.network(x)
        scores = {"cnn": out["logits"][:, : self.task.total]}
        if self.class_means.numel():
            scores["nme"] = -torch.cdist(F.normalize(out["features"].float(), dim=1), self.class_means)
        return scores

    def openset_confidence(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Confidence that a sample belongs to a seen class: the maximum softmax probability of the classifier
        of record (higher = more likely known)."""
        return F.softmax(scores[self.record], dim=1).max(1).values

    # ---- checkpoint state (see the rules in the module docstring) ----
    def extra_state(self) -> dict:
        """Plain, non-module state saved in checkpoints beside state_dict(); subclasses extend the dict (call
        super). Not nn.Module's get_extra_state, which would put non-tensors in the state dict that jit tracing
        (fvcore) reads."""
        return {"memory": self.memory.state_dict() if self.memory is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if self.memory is not None and state.get("memory") is not None:
            self.memory.load_state_dict(state["memory"])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint, first resizing buffers whose shape changed since construction (class means)."""
        for name, buffer in list(self.named_buffers()):
            if name in state_dict and state_dict[name].shape != buffer.shape:
                owner = self.get_submodule(name.rpartition(".")[0]) if "." in name else self
                setattr(owner, name.rpartition(".")[2], torch.empty_like(state_dict[name], device=buffer.device))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- helpers shared by the CE-based methods ----
    def seen_logits_ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """cil: CE over every seen class; til: CE over the current task's classes only."""
        task = self.task
        if self.cfg.incre_type == "til":
            return F.cross_entropy(logits[:, task.known: task.total], y - task.known)
        return F.cross_entropy(logits[:, : task.total], y)
