"""The Method base class: what an algorithm declares about itself, and the hooks of a task's life.

Per task the trainer (trainer/task_loop.py), a resume and a re-test all call `begin_task` -> the engine runs
the task's `stages` -> `end_task` -> evaluation through `predict`. `begin_task` and `end_task` are the
framework's and cannot be overridden (a subclass that defines them is refused at import); they do what every
method needs and call the method's own hooks:

    begin_task(task):  self.task = task; the frozen teacher `old_network` (when `distills`); grow the network
                       (`network.expand_head`, backbone/network.py); before_task(task); freeze the backbone
                       when `freeze_fe`
    end_task(task):    after_task(task, infer); the memory's exemplars of the new classes; the class means
                       (apply_nme)

A subclass implements `training_step` (or the step functions of its stages) and overrides only the hooks its
algorithm needs; task state lives in `self.task`. No method writes a batch loop, keeps a stage flag or calls the
engine's training loop itself: what a method may ask of the engine is `infer` (an inference pass, utils/types.py).

Capabilities, declared once as class attributes and enforced here:
- `replay`: "required" (memory_size 0 is refused), "optional", or "none" (memory_size > 0 is refused);
- `distills`: the method keeps `old_network`, a frozen copy of its network as it was before the task;
- `network_class`: the network `build_network` puts around the backbone;
- `record`: the prediction key whose accuracy is the method's result ("cnn", or "nme" for iCaRL).
Whether a method trains on one task holding every class is part of its registration (method_type single_step).

Rules that make every method checkpointable and resumable (a run is restored by building the method, calling
`begin_task` for every task reached, then loading its state):
- modules are created in `__init__` or `before_task` only, deterministically from the config and the task
  (e.g. the frozen copy of the previous network is made at the start of the next task, not at the end of one);
- all state is module parameters/buffers, or plain tensors/numbers/lists/dicts returned by `extra_state`
  (buffers may change shape between tasks: loading resizes them);
- weights change only in a stage, in an `Action` between stages, in `before_task` or in `after_task`; a stage's
  `data` and `trains` read the state but do not change it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from backbone import build_backbone
from backbone.incremental_net import IncrementalNet, frozen_copy
from backbone.network import Network
from backbone.vit import prompted_vit_net
from utils.config import key
from utils.losses import bounded_ce, class_task_bounds
from utils.memory import ExemplarMemory, FeatureCache
from utils.precision import upcast
from utils.registry import InvalidState, UserError
from utils.types import Inference, OptimConfig, Stage, Task


@dataclass(frozen=True)
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
    network_class: type[Network] = IncrementalNet

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("begin_task", "end_task"):
            if name in vars(cls):
                raise TypeError(f"{cls.__name__} defines {name}, which is the framework's; put the method's own "
                                f"work in {'before_task' if name == 'begin_task' else 'after_task'}")

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
            self.old_network: Network | None = None
        self.register_buffer("class_means", torch.zeros(0), persistent=True)
        self.register_buffer("task_bounds", class_task_bounds(data.tasks), persistent=False)

    def make_backbone(self) -> nn.Module:
        return build_backbone(self.cfg.backbone, self.cfg.pretrained, self.cfg.pretrain_path)

    def build_network(self) -> Network:
        return self.network_class(self.make_backbone())

    def build_memory(self):
        """The replay memory (None without one): exemplars chosen by `sampling_method`."""
        return ExemplarMemory.from_config(self.cfg, self.data.n_classes, self.data.seed)

    # ---- the lifecycle: the framework's part (final), around the method's hooks ----
    def begin_task(self, task: Task) -> None:
        """Enter `task`: set it, keep the teacher, grow the network, then the method's `before_task`."""
        self.task = task
        if self.distills:
            self.old_network = None if task.is_first else frozen_copy(self.network)
        self.network.expand_head(task.total)
        self.before_task(task)
        if self.cfg.freeze_fe:
            self.network.freeze_backbone()

    def end_task(self, task: Task, infer: Inference) -> None:
        """Leave `task` after its training: the method's `after_task`, then the memory's exemplars of the new
        classes and, with apply_nme, the class means (both on the network's features after `after_task`)."""
        self.after_task(task, infer)
        if isinstance(self.memory, ExemplarMemory):
            features_of = self.features_of(infer)
            self.memory.update(task.classes, task.total, self.data, features_of)
            if self.cfg.apply_nme:
                self.class_means = self.memory.class_means(self.data, features_of).to(self.class_means.device)

    # ---- the method's hooks, in the order of a task ----
    def before_task(self, task: Task) -> None:
        """What the method adds or freezes at the start of a task (after the network has grown)."""

    def train_data(self, task: Task, new_data):
        """New-class data, plus the replay memory when there is one."""
        if self.memory is None or len(self.memory) == 0:
            return new_data
        return new_data + self.data.dataset("train", self.memory.indices())

    def stages(self, task: Task, new_data, infer: Inference) -> list:
        """The task's training: one stage of `training_step` on `train_data` with the task's optimiser keys."""
        return [Stage("train", lambda: self.train_data(task, new_data), OptimConfig.from_config(self.cfg, task.is_first),
                      self.training_step)]

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called between backward and the optimiser step (gradient projection, clipping)."""

    def after_task(self, task: Task, infer: Inference) -> None:
        """What the method does once a task's stages are done (weight aligning, a classifier swap, prototypes);
        the memory is updated after it."""

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

    def load_extra_state(self, state: dict, seen: int | None = None) -> None:
        if state.get("memory") is not None:
            self.memory.load_state_dict(state["memory"], seen, len(self.data.train_y))

    def keeps_class_means(self) -> bool:
        """Whether `class_means` may hold anything (a checkpoint of any other run holding them is refused)."""
        return bool(self.cfg.apply_nme)

    def load_checkpoint_state(self, state: dict, extra: dict, seen: int) -> None:
        """Load a checkpoint's `state_dict()` and `extra_state()` after checking that they fit this method as
        rebuilt, with `seen` classes learnt by then: the same keys, tensors of the same shapes, finite; class
        means (only where the method keeps them) of one row per seen class and the network's feature width; the
        same extra state, and a memory of seen classes' train samples. Raises InvalidState otherwise."""
        own = self.state_dict()
        for missing in [k for k in own if k not in state][:1]:
            raise InvalidState(f"does not fit {self.cfg.method}'s network: it lacks '{missing}' (another method or "
                               "architecture?)")
        for unexpected in [k for k in state if k not in own][:1]:
            raise InvalidState(f"does not fit {self.cfg.method}'s network: it has the unexpected key '{unexpected}' "
                               "(another method or architecture?)")
        for name, mine in own.items():
            value = state[name]
            if not isinstance(value, torch.Tensor):
                raise InvalidState(f"holds a {type(value).__name__} under '{name}' instead of a tensor")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise InvalidState(f"holds non-finite values in '{name}'")
            if name == "class_means":
                self._check_class_means(value, seen)
            elif value.shape != mine.shape:
                raise InvalidState(f"does not fit {self.cfg.method}'s network: '{name}' has shape "
                                   f"{tuple(value.shape)}, the network's is {tuple(mine.shape)}")
        own_extra = self.extra_state()
        for name in [n for n in own_extra if n not in extra][:1]:
            raise InvalidState(f"lacks the extra state '{name}'")
        for name in [n for n in extra if n not in own_extra][:1]:
            raise InvalidState(f"has the unexpected extra state '{name}'")
        self.load_state_dict(state)
        self.load_extra_state(extra, seen)

    def _check_class_means(self, means: torch.Tensor, seen: int) -> None:
        if not means.numel():
            return
        if not self.keeps_class_means():
            raise InvalidState("holds class_means, which this run (apply_nme: false) never computes")
        if means.dim() != 2 or means.shape[0] != seen:
            raise InvalidState(f"'class_means' has shape {tuple(means.shape)}; it must have one row per seen class "
                               f"({seen})")
        if means.shape[1] != self.network.feature_dim:
            raise InvalidState(f"'class_means' has shape {tuple(means.shape)}; its rows must have the network's "
                               f"{self.network.feature_dim} features")

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

    def balanced_set(self, task: Task, infer: Inference):
        """The class-balanced set itself (see `balanced_indices`)."""
        return self.data.dataset("train", self.balanced_indices(task, infer))

    def balanced_indices(self, task: Task, infer: Inference) -> np.ndarray:
        """Train-pool positions of the class-balanced set of a second stage (DER, ACL, DynaMMo, UCIR, PODNet): the
        memory as it will be after this task, i.e. the old exemplars plus as many samples of each new class,
        chosen like the memory on the network's features."""
        return self.memory.balanced_indices(task, self.data, self.features_of(infer))

    def balanced_stage(self, name: str, data, step, trains, **recipe) -> Stage:
        """The class-balanced second stage: `epochs_finetune` epochs at `lrate_finetune` with the run's other
        optimiser keys of later tasks, a multi_step schedule at `milestones_finetune` (cosine when there are none),
        unless `recipe` (OptimConfig fields) says otherwise; `data` returns the balanced set."""
        cfg = self.cfg
        opt = OptimConfig.from_config(cfg, first_task=False).replace(
            epochs=cfg.epochs_finetune, lrate=cfg.lrate_finetune, milestones=tuple(cfg.milestones_finetune),
            scheduler="multi_step" if cfg.milestones_finetune else "cos")
        return Stage(name, data, opt.replace(**recipe), step, trains=trains)

    def features_of(self, infer: Inference) -> FeatureCache:
        """features_of(positions): the network's features (`network.features`) of the un-augmented train-pool
        samples at `positions`, each computed once."""
        return FeatureCache(lambda positions: infer(self.network.features,
                                                    self.data.dataset("train", positions, augment=False), self)[0])

    def logits_and_old(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's logits on x and, once there is a previous network, its logits (without gradients)."""
        if self.old_network is None:
            return self.network(x)["logits"], None
        with torch.no_grad():
            old_logits = self.old_network(x)["logits"]
        return self.network(x)["logits"], old_logits


class PromptMethod(Method):
    """The shape L2P, DualPrompt and CODA-Prompt share: a pretrained timm ViT that stays frozen (whatever
    `freeze_fe` says) and prompts that steer it (backbone/vit.py, backbone/prompt.py); only the prompts, their keys
    and the linear head learn; no replay. A subclass says how its prompts are chosen in `prompted`; the loss is CE
    over the current task's classes (as the prompt papers' code masks the other tasks' logits) plus the method's
    `prompt_losses`, and `predict` scores the seen classes."""

    replay = "none"

    def build_network(self) -> Network:
        return prompted_vit_net(self.cfg.backbone, self.cfg.pretrained, self.cfg.pretrain_path, self.data.img_size)

    @property
    def vit(self):
        return self.network.backbone

    def prompted(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, object]:
        """The logits of the prompted pass on x, and what `prompt_losses` needs (in training) or `predict` reports."""
        raise NotImplementedError

    def prompt_losses(self, aux) -> dict[str, torch.Tensor]:
        """The method's losses besides CE, from the second value `prompted` returned in training."""
        return {}

    def training_step(self, x, y):
        logits, aux = self.prompted(x, train=True)
        return {"ce": bounded_ce(logits, y, self.task.known, self.task.total), **self.prompt_losses(aux)}

    def predict(self, x):
        return {"cnn": self.prompted(x, train=False)[0][:, : self.task.total]}
