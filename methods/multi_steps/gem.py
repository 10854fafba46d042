"""GEM: Gradient Episodic Memory for Continual Learning (Lopez-Paz, Ranzato; NeurIPS 2017).

Idea: keep an episodic memory per past task and never let an update increase the loss on any of them, to first
order. At every step the gradient g_k of the loss on each past task's memory is computed; if the proposed
gradient g conflicts with one of them (<g, g_k> < 0), it is replaced by the closest gradient that conflicts with
none, found through the dual of that quadratic program (G = [g_1; ...; g_t], solved with `quadprog`):

    min_v 1/2 v^T G G^T v + g^T G^T v   s.t.  v >= memory_strength;      g~ = G^T v + g

so that G g~ >= 0. The memory only constrains the updates; it is not trained on directly.

The update that is applied is the projected gradient itself: GEM trains with plain SGD (theta <- theta - lr * g~,
as in the paper and the authors' code). Momentum or weight decay would add terms after the projection (the
momentum buffer of earlier steps, lr * wd * theta), so the applied step could again raise a past task's loss
(on digits, 16 of 88 steps did with momentum 0.9); Adam rescales each coordinate and breaks the constraint too.
Such settings are refused with a one-line error; the learning-rate schedule is honoured (it only scales g~).

Deviations and choices:
- Memory gradients are accumulated over chunks of `replay_batch_size` (default batch_size) samples of a task's
  memory, so any memory size fits on the device (the original fed each task's whole memory as one batch and kept
  the gradient matrix on the GPU for every step); the memory images are loaded once per task, without
  augmentation, through the shared inference loop.
- Memory strength enters as the lower bound of v (as in the authors' and the original code; the paper's text
  adds it to v*), which keeps G g~ >= 0; the QP's Hessian gets 1e-3 on its diagonal for positive definiteness.
- cil: every CE over the seen classes; til: each sample's CE within its own task (past-task memories included).
- The head grows per task (the original allocates every class at once); the constraint covers all trainable
  parameters.
- Distributed runs: every rank computes the same memory gradients on the whole memories (batch norm local there:
  `distributed.replicated`) and projects the all-reduced gradient, so every rank applies one process's update.
- Under mixed precision the memory gradients are computed with autocast off, in float32, and the projection in
  float64; the step's own gradient is float32 (float16 autocast: unscaled before the projection).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from methods import register_method
from methods.base import Method
from utils import distributed
from utils.config import key
from utils.registry import UserError
from utils.types import OptimConfig, Stage


def gem_project(g: torch.Tensor, memory_grads: torch.Tensor, memory_strength: float, eps: float = 1e-3):
    """The GEM projection of gradient g (P,) against memory gradients (t, P), via the dual QP above."""
    import quadprog

    G, grad = memory_grads.double().cpu().numpy(), g.double().cpu().numpy()
    t = G.shape[0]
    hessian = G @ G.T
    hessian = 0.5 * (hessian + hessian.T) + eps * np.eye(t)
    # quadprog minimises 1/2 v^T H v - a^T v subject to C^T v >= b
    v = quadprog.solve_qp(hessian, -(G @ grad), np.eye(t), np.full(t, memory_strength))[0]
    return torch.from_numpy(G.T @ v + grad).to(g)


@dataclass(frozen=True)
class GEMConfig:
    memory_strength: float = key(0.5, "GEM memory strength: lower bound of the dual variables (0: plain projection)",
                                  range="[0, inf)")


@register_method("gem", config=GEMConfig)
class GEM(Method):
    replay = "required"  # an episodic memory per past task

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        for first in (True, False):
            opt = OptimConfig.from_config(cfg, first)
            if opt.opt_type != "sgd" or opt.opt_mom != 0 or opt.weight_decay != 0:
                raise UserError("gem applies the projected gradient as it is, which only plain SGD does: set opt_type: "
                                "sgd, opt_mom: 0 and weight_decay: 0 (and their init_* keys)")
        self.task_memories: list[tuple[torch.Tensor, torch.Tensor]] = []  # per past task, loaded per task
        self.memory_grads: torch.Tensor | None = None  # (past tasks, P) of the current step

    def stages(self, task, new_data, infer):
        def new_data_and_memories():
            """The stage trains on the new data only; the past tasks' memories are loaded beside it (without
            augmentation, through the inference loop) for the constraints."""
            device = self.class_means.device
            self.task_memories = []
            for past in self.data.tasks[: task.index]:
                indices = np.concatenate([self.memory.exemplars[c] for c in past.classes])
                images, labels = infer(lambda x: x, self.data.dataset("train", indices, augment=False), self)
                self.task_memories.append((images.to(device), labels.to(device)))
            return new_data

        return [Stage("train", new_data_and_memories, OptimConfig.from_config(self.cfg, task.is_first),
                      self.training_step)]

    def training_step(self, x, y):
        # every rank computes the same whole memory gradients, in float32: autocast off (backward passes are not
        # meant to run under autocast, and the QP's constraints need the gradients' directions exactly)
        with distributed.replicated(), torch.autocast(x.device.type, enabled=False):
            self.memory_grads = torch.stack([self._gradient(*memory) for memory in self.task_memories]) \
                if self.task_memories else None
        return {"ce": self.ce(self.network(x)["logits"], y)}

    def before_optimizer_step(self):
        if self.memory_grads is None:
            return
        params = self._params()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        if (self.memory_grads.double() @ g.double() < 0).any():  # float64: never a matrix product under autocast
            g = gem_project(g, self.memory_grads, self.cfg.memory_strength)
            for p, new in zip(params, g.split([p.numel() for p in params])):
                p.grad = new.view_as(p).clone()
        self.memory_grads = None

    def after_task(self, task, infer):
        self.task_memories = []

    def _params(self):
        return [p for p in self.parameters() if p.requires_grad]

    def _gradient(self, images, labels):
        """Flat gradient of the mean loss over one past task's memory, accumulated chunk by chunk."""
        params = self._params()
        total = [torch.zeros_like(p) for p in params]
        size = self.cfg.replay_batch_size or self.cfg.batch_size
        for xb, yb in zip(images.split(size), labels.split(size)):
            loss = self.ce(self.network(xb)["logits"], yb) * (len(yb) / len(labels))
            for acc, grad in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if grad is not None:
                    acc += grad
        return torch.cat([t.flatten() for t in total])
