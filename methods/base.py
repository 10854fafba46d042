"""The Method base class: what an algorithm declares about itself, and the hooks the task loop calls per task.

Per task the task loop (trainer/task_loop.py) calls `before_task` -> the engine runs the task's `stages`
-> `after_task` -> evaluation through `predict`. A subclass implements `training_step` (or the step functions of
its stages) and overrides only the hooks its algorithm needs; task state lives in `self.task`. No method writes a
batch loop, keeps a stage flag or calls the engine's training loop itself.

Capabilities, declared once as class attributes and enforced here:
- `replay`: "required" (memory_size 0 is refused), "optional", or "none" (memory_size > 0 is refused);
- `distills`: the method keeps `old_network`, a frozen copy of its network as it was before the task;
- `network_class`: the network `build_network` puts around the backbone;
- `record`: the prediction key whose accuracy is the method's result ("cnn", or "nme" for iCaRL).
Whether a method trains on one task holding every class is part of its registration (method_type single_step).

Rules that make every method checkpointable and resumable (a run is restored by building the method, replaying
`before_task` for every task reached, then `load_state_dict`):
- modules are created in `__init__` or `before_task` only, deterministically from the config and the task
  (e.g. the frozen copy of the previous network is made at the start of the next task, not at the end of one);
- all state is module parameters/buffers, or plain tensors/numbers/lists/dicts returned by `extra_state`
  (buffers may change shape between tasks: loading resizes them);
- weights change only in a stage, in an `Action` between stages, in `before_task` or in `after_task`; a stage's
  `data` and `trains` read the state but do not change it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from backbone import build_backbone
from backbone.incremental_net import IncrementalNet, frozen_copy
from utils.config import key
from utils.losses import bounded_ce, class_task_bounds
from utils.memory import ExemplarMemory, FeatureCache
from utils.precision import upcast
from utils.registry import UserError
from utils.types import OptimConfig, Stage, Task


@dataclass
class BalancedStageConfig:
    """Keys of the second, class-balanced stage after each later task (DER, ACL, DynaMMo, UCIR, PODNet). A method
    changes a default by redeclaring the key with a plain value (its help is kept)."""

    epochs_finetune: int = key(0, "epochs of the class-balanced stage after each later task (0: off)",
                               range="[0, inf)")
    lrate_finetune: float = key(0.01, "learning rate of the class-balanced stage", range="(0, inf)")
    milestones_finetune: list[int] = key([], "multi_step milestones of the class-balanced stage (UCIR, PODNet: "
                                             "none means a cosine schedule)", range="[1, inf)")


class Method(nn.Module):
    record = "cnn"
    replay = "optional"
    distills = False
    network_class: type[nn.Module] = IncrementalNet

    def __init__(self, cfg, data):
        super().__init__()
        self.cfg, self.data = cfg, data
        self.task: Task | None = None
        self.memory = self.build_memory()
        if self.replay == "required" and self.memory is None:
            raise UserError(f"{cfg.method} replays stored samples of old classes: set memory_size > 0 "
                            "(e.g. --memory_size 200)")
        if self.replay == "none" and self.memory is not None:
            raise UserError(f"{cfg.method} trains without a replay memory: set memory_size: 0")
        if cfg.apply_nme and not isinstance(self.memory, ExemplarMemory):
            raise UserError(f"apply_nme: true needs a replay memory of exemplars (memory_size > 0); {cfg.method} "
                            "has none: set apply_nme: false")
        self.network = self.build_network()
        if self.distills:
            self.old_network: nn.Module | None = None
        self.register_buffer("class_means", torch.zeros(0), persistent=True)
        self.register_buffer("task_bounds", class_task_bounds(data.tasks), persistent=False)

    def make_backbone(self) -> nn.Module:
        return build_backbone(self.cfg.backbone, self.cfg.pretrained, self.cfg.pretrain_path)

    def build_network(self) -> nn.Module:
        network = self.network_class(self.make_backbone())
        if self.cfg.freeze_fe:
            network.freeze_backbone()
        return network

    def build_memory(self):
        """The replay memory (None without one): exemplars chosen by `sampling_method`."""
        return ExemplarMemory.from_config(self.cfg, self.data.n_classes, self.data.seed)

    # ---- lifecycle, in the order the task loop calls it ----
    def before_task(self, task: Task) -> None:
        if self.distills:
            self.old_network = None if task.is_first else frozen_copy(self.network)
        self.network.expand_head(task.total)

    def train_data(self, task: Task, new_data):
        """New-class data, plus the replay memory when there is one."""
        if self.memory is None or len(self.memory) == 0:
            return new_data
        return new_data + self.data.dataset("train", self.memory.indices())

    def stages(self, task: Task, new_data, engine) -> list:
        """The task's training: one stage of `training_step` on `train_data` with the task's optimiser keys."""
        return [Stage("train", lambda: self.train_data(task, new_data), OptimConfig.from_config(self.cfg, task.is_first),
                      self.training_step)]

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called between backward and the optimiser step (gradient projection, clipping)."""

    def after_task(self, task: Task, engine) -> None:
        """Update the memory for the new classes and, with apply_nme, the class means."""
        if self.memory is not None:
            features_of = self.features_of(engine)
            self.memory.update(task.classes, task.total, self.data, features_of)
            if self.cfg.apply_nme:
                self.class_means = self.memory.class_means(self.data, features_of).to(self.class_means.device)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores over the seen classes per classifier: "cnn" logits, and "nme" (negative distance to the
        class means) when apply_nme. A method that routes samples to tasks adds "task_id": the (B,) task index
        it picked, reported as task-id accuracy."""
        out = self.network(x)
        scores = {"cnn": out["logits"][:, : self.task.total]}
        if len(self.class_means) >= self.task.total:  # not inside a task, before its classes have means
            scores["nme"] = -torch.cdist(F.normalize(upcast(out["features"]), dim=1), self.class_means)
        return scores

    def openset_confidence(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Confidence that a sample belongs to a seen class: the maximum softmax probability of the classifier
        of record (higher = more likely known)."""
        return F.softmax(scores[self.record], dim=1).max(1).values

    def train(self, mode: bool = True):
        """Train mode, except for every module whose parameters are all frozen (frozen backbones, old branches
        and adapters, teachers): those keep running in eval mode, so their BN statistics do not move."""
        super().train(mode)
        if mode:
            for module in self.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self

    # ---- checkpoint state (see the rules in the module docstring) ----
    def extra_state(self) -> dict:
        """Plain, non-module state saved in checkpoints beside state_dict(); subclasses extend the dict (call
        super). Not nn.Module's get_extra_state, which would put non-tensors in the state dict that jit tracing
        (fvcore) reads."""
        plain = self.memory is not None and not isinstance(self.memory, nn.Module)  # a module is in state_dict()
        return {"memory": self.memory.state_dict() if plain else None}

    def load_extra_state(self, state: dict) -> None:
        if state.get("memory") is not None:
            self.memory.load_state_dict(state["memory"])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint, first resizing buffers whose shape changed since construction (class means)."""
        for name, buffer in list(self.named_buffers()):
            if name in state_dict and state_dict[name].shape != buffer.shape:
                owner = self.get_submodule(name.rpartition(".")[0]) if "." in name else self
                setattr(owner, name.rpartition(".")[2], torch.empty_like(state_dict[name], device=buffer.device))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- helpers shared by the methods ----
    def class_bounds(self, y: torch.Tensor, seen: int | None = None):
        """[lo, hi) of the classes a sample of class y is classified among: every seen class (cil; `seen`
        overrides their number), or the classes of its own task (til, a (B,) pair)."""
        if self.cfg.incre_type == "til":
            return self.task_bounds[y].unbind(1)
        return 0, self.task.total if seen is None else seen

    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the classes `class_bounds` allows."""
        return bounded_ce(logits, y, *self.class_bounds(y))

    def balanced_set(self, task: Task, engine):
        """The class-balanced set of a second stage (DER, UCIR, PODNet): the memory as it will be after this task,
        i.e. the old exemplars plus as many samples of each new class, chosen like the memory on the network's
        features."""
        return self.data.dataset("train", self.memory.balanced_indices(task, self.data, self.features_of(engine)))

    def features_of(self, engine, forward=None) -> FeatureCache:
        """features_of(positions): the un-augmented train-pool samples through `forward` (default: the network's
        penultimate features), each computed once."""
        forward = forward or (lambda x: self.network(x)["features"])
        return FeatureCache(lambda positions: engine.infer(forward, self.data.dataset("train", positions, augment=False),
                                                           self)[0])

    def logits_and_old(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's logits on x and, once there is a previous network, its logits (without gradients)."""
        if self.old_network is None:
            return self.network(x)["logits"], None
        with torch.no_grad():
            old_logits = self.old_network(x)["logits"]
        return self.network(x)["logits"], old_logits
