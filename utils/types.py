"""The small types every layer shares: a task, a stage of a task's training and its optimiser settings, and the
inference pass a method may ask the engine for.

They import nothing of the project, so datasets, backbones, methods and the trainer can all use them.

A method describes how it trains on a task as a list of `Stage`s and `Action`s (`Method.stages`); the engine
(`trainer.engine.engine.Engine`) runs them in order, checkpoints by stage name and epoch, and resumes there:
- a `Stage` trains for `optim.epochs` epochs: `step(x, y, ...)` returns named losses on each batch of `data()`,
  and only the parameters of `trains()` learn (default: every parameter that requires grad);
- an `Action` is a one-off change of the weights between two stages, run once with no gradient (DynaMMo's
  merge). Its effect is in every later checkpoint, so a run resumed after it does not run it again.
`data` is called when its stage starts (also when a run resumes inside it), so it may depend on what earlier
stages learnt; it must not depend on anything its own stage changes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Protocol


@dataclass(frozen=True)
class Task:
    """One task: it adds the classes [known, total) of the remapped label space."""

    index: int
    known: int
    total: int
    n_tasks: int

    @property
    def classes(self) -> range:
        return range(self.known, self.total)

    @property
    def is_first(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class OptimConfig:
    epochs: int
    lrate: float
    batch_size: int
    opt_type: str = "sgd"
    opt_mom: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str | None = None
    milestones: tuple = ()
    lrate_decay: float = 0.1

    @classmethod
    def from_config(cls, cfg, first_task: bool) -> "OptimConfig":
        """The plain keys; in the first task each `init_*` key that is set replaces its plain key."""

        def pick(name):
            init = getattr(cfg, "init_" + name)
            return init if first_task and init is not None else getattr(cfg, name)

        return cls(epochs=pick("epochs"), lrate=pick("lrate"), batch_size=cfg.batch_size, opt_type=cfg.opt_type,
                   opt_mom=pick("opt_mom"), nesterov=pick("nesterov"), weight_decay=pick("weight_decay"),
                   scheduler=pick("scheduler"), milestones=tuple(pick("milestones")), lrate_decay=pick("lrate_decay"))

    def replace(self, **changes) -> "OptimConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class Stage:
    """Train `step` on `data()` for `optim.epochs` epochs; only the parameters of `trains()` learn."""

    name: str
    data: Callable[[], Any]
    optim: OptimConfig
    step: Callable[..., dict]
    trains: Callable[[], Iterable] | None = None  # modules or parameters; None: whatever requires grad


@dataclass(frozen=True)
class Action:
    """A one-off weight change between stages, run once under no_grad (not again when resuming after it)."""

    name: str
    run: Callable[[], None]


class Inference(Protocol):
    """What a method may ask of the engine (its `infer`): run `fn(x)` -> a tensor or a dict of tensors over every
    sample of `dataset` in order, without gradients and with `module` in eval mode (modes restored after);
    returns the outputs, concatenated on the CPU, and the targets. In a distributed run each process runs its
    share and every process gets every output; `whole=True` runs every sample on every process (a pass with side
    effects, such as re-estimating BN statistics)."""

    def __call__(self, fn: Callable, dataset: Any, module: Any, batch_size: int = 256,
                 whole: bool = False) -> tuple[Any, Any]: ...
