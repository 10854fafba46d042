"""The task lifecycle no method can skip: `Method.begin_task` and `Method.end_task` are the framework's (a subclass
defining them is refused), they keep the teacher, grow the network, honour freeze_fe and update the memory
whatever the method's own hooks do, and nothing but them calls those hooks or sets the task."""
import ast
import glob
import os

import pytest
import torch

from conftest import ROOT, TINY
from datasets.scenario import DataManager
from methods import method_config
from methods.base import Method
from trainer.cli import parse_overrides
from trainer.config_loader import load_config
from trainer.engine.engine import Engine


class Distiller(Method):
    """A method written carelessly: it distils, and its hooks never call super()."""

    distills = True
    calls: list

    def before_task(self, task):
        self.calls = [*getattr(self, "calls", []), ("before_task", task.index)]

    def after_task(self, task, infer):
        self.calls.append(("after_task", task.index))

    def training_step(self, x, y):
        logits, old_logits = self.logits_and_old(x)
        return {"ce": self.ce(logits, y)}


def build(cls, *overrides):
    cfg = load_config(os.path.join(ROOT, "options", "finetune_il", "digits.yaml"),
                      parse_overrides([*TINY, "--img_size", "8", "--memory_size", "20", *overrides]), method_config)
    return cls(cfg, DataManager(cfg, seed=1))


def test_a_method_that_skips_super_still_gets_its_teacher_head_and_memory():
    method = build(Distiller)
    first, second = method.data.tasks
    method.begin_task(first)
    assert method.task is first and method.old_network is None and method.network.n_classes == first.total
    method.end_task(first, Engine(torch.device("cpu"), amp=False).infer)
    assert sorted(method.memory.exemplars) == list(first.classes)  # the memory is the framework's to update
    with torch.no_grad():
        method.network.fc.weight.add_(1.0)  # what training the first task would have changed
    before = {k: v.clone() for k, v in method.network.state_dict().items()}
    method.begin_task(second)
    assert method.calls == [("before_task", 0), ("after_task", 0), ("before_task", 1)]
    teacher = method.old_network
    assert teacher is not None and teacher is not method.network
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())  # the network before the task
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert method.network.n_classes == second.total
    x = torch.randn(4, 3, 8, 8)
    assert method.logits_and_old(x)[1] is not None  # it distils


def test_freeze_fe_holds_whatever_before_task_does():
    class Unfreezer(Distiller):
        def before_task(self, task):
            self.network.freeze_backbone(False)

    method = build(Unfreezer, "--freeze_fe", "true")
    method.begin_task(method.data.tasks[0])
    assert not any(p.requires_grad for p in method.network.backbone.parameters())
    assert method.network.fc.weight.requires_grad


@pytest.mark.parametrize("name", ["begin_task", "end_task"])
def test_a_method_cannot_define_the_frameworks_hooks(name):
    with pytest.raises(TypeError, match=name):
        type("Bad", (Method,), {name: lambda self, *args: None})


def _calls_and_assignments(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("before_task", "after_task") and not (
                    isinstance(node.func.value, ast.Name) and node.func.value.id in ("self", "hook")):
            yield os.path.relpath(path, ROOT), f"calls .{node.func.attr}()"
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr == "task":
                    yield os.path.relpath(path, ROOT), "sets .task"


def test_only_the_lifecycle_calls_the_hooks_and_sets_the_task():
    """The trainer, resume, re-test and the benchmarks go through begin_task/end_task (a hook's after_task is
    another thing); only methods/base.py sets `task`."""
    paths = [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
             if os.sep + "tests" + os.sep not in p]
    assert [f for p in paths for f in _calls_and_assignments(p)] == [(os.path.join("methods", "base.py"), "sets .task")]
