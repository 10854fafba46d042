"""The shared training loop (trainer/engine, Engine) and checkpoints, by what they do to a toy method whose
gradients are known in closed form: one optimiser step per batch on the sum of the named losses, gradients
zeroed every step, the optimiser and schedule the stage asks for, hooks after every epoch, stages and actions in
order, and a resumed stage that ends exactly where an uninterrupted one does."""
import copy
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trainer import checkpoint, seed
from utils.registry import UserError
from trainer.engine.engine import Engine
from trainer.engine.hooks import Hook
from utils.types import Action, OptimConfig, Stage, Task

pytestmark = pytest.mark.precision  # the engine's tests run in float32 and under bfloat16 autocast

TASK = Task(0, 0, 2, 1)


class Toy(nn.Module):
    """What the engine needs of a method: parameters, train(), to() and the gradient-surgery hook."""

    def __init__(self, n=3):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))
        self.v = nn.Parameter(torch.ones(n))
        self.surgery = []

    def before_optimizer_step(self):
        self.surgery.append(None if self.w.grad is None else self.w.grad.clone())


def data(n, dim=3):
    return TensorDataset(torch.arange(n * dim, dtype=torch.float32).view(n, dim) / (n * dim),
                         torch.zeros(n, dtype=torch.long), torch.arange(n))


def fit(method, step, n=10, trains=None, seed=0, **opt):
    settings = dict(epochs=1, lrate=0.1, batch_size=4, opt_mom=0.0)
    settings.update(opt)
    engine = Engine(torch.device("cpu"), seed=seed)
    return engine.fit(method, TASK, Stage("s", lambda: data(n), OptimConfig(**settings), step, trains))


def constant_gradients(method, a=1.0, b=2.0):
    """Two named losses with gradients a and b on every coordinate of w (and none on v)."""
    calls = []

    def step(x, y, i):
        calls.append(len(x))
        return {"a": a * method.w.sum(), "b": b * method.w.sum()}

    return step, calls


# ---- one step per batch, on the sum of the losses, gradients zeroed each time ----
@pytest.mark.parametrize("n, batches", [(10, 3), (9, 2), (8, 2), (3, 1)])  # only a lone last sample is dropped
def test_every_batch_is_one_optimiser_step_on_the_sum_of_the_losses(n, batches):
    method = Toy()
    step, calls = constant_gradients(method)
    fit(method, step, n=n, epochs=3, lrate=0.1)
    steps = 3 * batches
    assert len(calls) == steps and len(method.surgery) == steps
    # w_k = w_{k-1} - lr * (1 + 2): gradients summed over the losses and zeroed before each backward
    torch.testing.assert_close(method.w.detach(), torch.full((3,), -0.1 * 3 * steps))
    assert torch.equal(method.v.detach(), torch.ones(3))


def test_returned_losses_are_the_means_of_the_last_epochs_batches():
    method = Toy()
    seen = []

    def step(x, y, i):
        seen.append(float(x.mean()))
        return {"a": method.w.sum() * 0 + x.mean(), "b": method.w.sum() * 0 + 2.0}

    means = fit(method, step, n=8, epochs=2, batch_size=4)
    assert means["a"] == pytest.approx(np.mean(seen[2:])) and means["b"] == pytest.approx(2.0)


def test_the_surgery_hook_runs_after_backward_and_its_gradient_is_the_one_applied():
    method = Toy()

    def step(x, y, i):
        return {"a": method.w.sum()}

    def double():
        method.surgery.append(method.w.grad.clone())
        method.w.grad *= 2

    method.before_optimizer_step = double
    fit(method, step, n=4, epochs=1, batch_size=4, lrate=0.5)
    assert len(method.surgery) == 1 and torch.equal(method.surgery[0], torch.ones(3))
    torch.testing.assert_close(method.w.detach(), torch.full((3,), -1.0))


# ---- the optimiser and the schedule the stage asks for ----
def test_multi_step_schedule_steps_once_per_epoch():
    method = Toy()
    step, _ = constant_gradients(method, 1.0, 0.0)
    fit(method, step, n=8, epochs=3, lrate=1.0, scheduler="multi_step", milestones=(1, 2), lrate_decay=0.1)
    torch.testing.assert_close(method.w.detach(), torch.full((3,), -2 * (1 + 0.1 + 0.01)))


def test_cosine_schedule_anneals_over_the_stage_epochs():
    method = Toy()
    step, _ = constant_gradients(method, 1.0, 0.0)
    epochs = 4
    fit(method, step, n=4, epochs=epochs, lrate=1.0, scheduler="cos")
    lrs = [(1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    torch.testing.assert_close(method.w.detach(), torch.full((3,), -sum(lrs)))


@pytest.mark.parametrize("opt, expected", [
    (dict(opt_mom=0.9), -0.1 * (1 + 1.9)),                                  # buffer g, then 0.9 g + g
    (dict(opt_mom=0.9, nesterov=True), -0.1 * (1.9 + (0.9 * 1.9 + 1))),     # g + mu * buffer
    (dict(weight_decay=0.5), None),                                          # g + wd * w
    (dict(opt_type="adam"), -0.1 * 2),                                       # ~ lr * sign(g) per step
])
def test_the_optimiser_settings_are_applied(opt, expected):
    method = Toy()
    with torch.no_grad():
        method.w.fill_(1.0 if "weight_decay" in opt else 0.0)
    step, _ = constant_gradients(method, 1.0, 0.0)
    fit(method, step, n=4, epochs=2, batch_size=4, lrate=0.1, **opt)
    if expected is None:  # w1 = 1 - 0.1 (1 + 0.5), w2 = w1 - 0.1 (1 + 0.5 w1)
        w1 = 1 - 0.1 * 1.5
        expected = w1 - 0.1 * (1 + 0.5 * w1)
    torch.testing.assert_close(method.w.detach(), torch.full((3,), expected), atol=1e-6, rtol=1e-5)


def test_adamw_decays_the_weights_apart_from_the_gradient():
    method = Toy()
    with torch.no_grad():
        method.w.fill_(1.0)
    step, _ = constant_gradients(method, 1.0, 0.0)
    fit(method, step, n=4, epochs=1, batch_size=4, lrate=0.1, opt_type="adamw", weight_decay=0.5)
    torch.testing.assert_close(method.w.detach(), torch.full((3,), 1.0 * (1 - 0.1 * 0.5) - 0.1), atol=1e-6, rtol=0)


# ---- what trains, and what stops a run ----
def test_only_the_stages_parameters_learn_and_the_flags_are_restored():
    method = Toy()
    method.v.requires_grad_(False)
    extra = nn.Parameter(torch.ones(2))
    method.u = extra

    def step(x, y, i):
        return {"a": method.w.sum() + method.u.sum()}

    fit(method, step, n=4, trains=lambda: [method.u], epochs=1, batch_size=4)
    assert torch.equal(method.w.detach(), torch.zeros(3)) and not torch.equal(method.u.detach(), torch.ones(2))
    assert method.w.requires_grad and not method.v.requires_grad and method.u.requires_grad


def test_a_non_finite_loss_stops_the_run_with_a_user_error():
    method = Toy()
    with pytest.raises(UserError, match="non-finite.*'s'"):
        fit(method, lambda x, y, i: {"a": method.w.sum() + float("nan")}, n=4)


def test_a_stage_with_nothing_to_train_is_an_error():
    method = Toy()
    method.requires_grad_(False)
    with pytest.raises(RuntimeError):
        fit(method, lambda x, y, i: {"a": method.w.sum()}, n=4)


def test_extra_fields_of_a_sample_reach_the_step_and_batches_are_shuffled_by_the_run_seed_alone():
    def orders(seed):
        method, seen = Toy(), []

        def step(x, y, i):
            seen.extend(i.tolist())
            return {"a": method.w.sum()}

        torch.manual_seed(seed + 100)  # the global stream plays no part in the order
        fit(method, step, n=8, epochs=2, batch_size=4, seed=seed)
        return seen

    first = orders(0)
    assert sorted(first[:8]) == list(range(8)) and sorted(first[8:]) == list(range(8))  # each sample once an epoch
    assert orders(0) == first and orders(1) != first and first[:8] != first[8:]


# ---- hooks, stages and actions ----
def test_hooks_run_after_every_epoch_in_registration_order_and_share_their_metrics():
    method = Toy()
    engine = Engine(torch.device("cpu"))
    calls = []

    class First(Hook):
        def after_epoch(self, end):
            end.metrics["acc"] = 10.0 * end.epoch
            calls.append(("first", end.stage, end.epoch, end.epochs))

    class Second(Hook):
        def after_epoch(self, end):
            calls.append(("second", end.metrics["acc"], end.losses["a"]))

    engine.register(First())
    engine.register(Second())
    opt = OptimConfig(epochs=2, lrate=0.1, batch_size=4, opt_mom=0.0)
    engine.fit(method, TASK, Stage("s", lambda: data(4), opt, lambda x, y, i: {"a": method.w.sum() + 1.0}))
    assert [c[0] for c in calls] == ["first", "second"] * 2
    assert calls[0][1:] == ("s", 1, 2) and calls[2][1:] == ("s", 2, 2)
    assert calls[1][1] == 10.0 and calls[3][1] == 20.0 and calls[1][2] == pytest.approx(1.0)


def _stages(method, log, epochs=2):
    opt = OptimConfig(epochs=epochs, lrate=0.1, batch_size=4, opt_mom=0.9)

    def step(name):
        def run(x, y, i):
            log.append(name)
            return {"a": (method.w * x).sum()}
        return run

    def action():
        log.append(("action", torch.is_grad_enabled()))
        method.v.mul_(2)

    return [Stage("one", lambda: data(8), opt, step("one")), Action("double", action),
            Stage("two", lambda: data(8), opt, step("two"))]


def test_stages_and_actions_run_in_order_and_an_action_runs_once_without_gradients():
    method, log = Toy(), []
    Engine(torch.device("cpu")).train(method, TASK, _stages(method, log))
    assert log == ["one"] * 4 + [("action", False)] + ["two"] * 4
    assert torch.equal(method.v.detach(), torch.full((3,), 2.0))
    with pytest.raises(ValueError):
        Engine(torch.device("cpu")).train(method, TASK, _stages(method, log) + _stages(method, log)[:1])


def test_a_resumed_stage_ends_exactly_where_the_uninterrupted_one_does():
    from trainer.seed import rng_state

    torch.manual_seed(0)
    whole, log = Toy(), []
    Engine(torch.device("cpu")).train(whole, TASK, _stages(whole, log, epochs=3))

    torch.manual_seed(0)
    first, saved = Toy(), {}

    class Save(Hook):  # a checkpoint after the first epoch of stage "two", as CheckpointHook takes it
        def after_epoch(self, end):
            if end.stage == "two" and end.epoch == 1:
                saved.update(stage="two", epoch=1, optimizer=copy.deepcopy(end.optimizer.state_dict()),
                             scheduler=None, rng=rng_state(), w=first.w.detach().clone(), v=first.v.detach().clone())

    engine = Engine(torch.device("cpu"))
    engine.register(Save())
    engine.train(first, TASK, _stages(first, [], epochs=3))
    resumed, log = Toy(), []
    with torch.no_grad():
        resumed.w.copy_(saved["w"])
        resumed.v.copy_(saved["v"])
    torch.manual_seed(123)  # whatever the RNG is now, the checkpoint's state is restored
    Engine(torch.device("cpu")).train(resumed, TASK, _stages(resumed, log, epochs=3), resume=saved)
    assert log == ["two"] * 4  # stage one and the action are in the checkpoint; two continues at epoch 2
    torch.testing.assert_close(resumed.w, whole.w, atol=0, rtol=0)
    torch.testing.assert_close(resumed.v, whole.v, atol=0, rtol=0)


def test_resuming_in_a_stage_the_method_does_not_have_is_a_user_error():
    method = Toy()
    with pytest.raises(UserError, match="stage 'three'"):
        Engine(torch.device("cpu")).train(method, TASK, _stages(method, []), resume={"stage": "three"})


# ---- inference ----
def test_infer_returns_every_output_in_dataset_order_with_the_targets():
    engine = Engine(torch.device("cpu"))
    x = torch.arange(10, dtype=torch.float32)[:, None]
    ds = TensorDataset(x, torch.arange(10) % 3)
    out, y = engine.infer(lambda b: {"double": 2 * b, "neg": -b}, ds, nn.Linear(1, 1), batch_size=3)
    torch.testing.assert_close(out["double"], 2 * x)
    torch.testing.assert_close(out["neg"], -x)
    assert y.tolist() == (torch.arange(10) % 3).tolist()


# ---- checkpoints ----
def test_rng_state_round_trips_python_numpy_and_torch():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = seed.rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    seed.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_checkpoint_files_round_trip_and_bad_files_are_user_errors(tmp_path):
    path = str(tmp_path / "seed1_latest.pt")
    state = {"config": {}, "seed": 1, "method": {"w": torch.arange(3.0)}, "position": {"task": 2, "done": True},
             "extra": {}, "rng": seed.rng_state(), "record": {}}
    checkpoint.save(path, state)
    assert os.listdir(tmp_path) == ["seed1_latest.pt"]  # written to a temporary name, then renamed
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["method"]["w"], torch.arange(3.0)) and loaded["position"] == {"task": 2, "done": True}
    torch.save({"version": checkpoint.VERSION + 1}, str(tmp_path / "other.pt"))
    with open(tmp_path / "broken.pt", "wb") as f:
        f.write(open(path, "rb").read()[:100])
    torch.save({"version": checkpoint.VERSION, "method": {}}, str(tmp_path / "partial.pt"))
    for name in ("other.pt", "broken.pt", "partial.pt"):
        with pytest.raises(UserError, match="checkpoint"):
            checkpoint.load(str(tmp_path / name))
    assert checkpoint.latest_path("run", 3) == os.path.join("run", "checkpoints", "seed3_latest.pt")
    assert checkpoint.task_path("run", 3, 1) == os.path.join("run", "checkpoints", "seed3_task1.pt")


def test_checkpoint_hook_saves_every_n_epochs_with_the_position_and_optimiser_state():
    from trainer.hooks import CheckpointHook

    saved = []

    class Recording(CheckpointHook):
        def save(self, position, **extra):
            saved.append((position, extra))

    method = Toy()
    engine = Engine(torch.device("cpu"))
    engine.register(Recording(SimpleNamespace(checkpoint_every=2), run_dir="unused"))
    opt = OptimConfig(epochs=5, lrate=0.1, batch_size=4, opt_mom=0.9, scheduler="cos")
    engine.fit(method, TASK, Stage("s", lambda: data(4), opt, lambda x, y, i: {"a": method.w.sum()}))
    assert [w for w, _ in saved] == [{"task": 0, "done": False, "stage": "s", "epoch": e} for e in (2, 4)]
    extra = saved[-1][1]
    assert extra["optimizer"]["state"] and extra["scheduler"]["last_epoch"] == 4


def test_a_method_loads_class_means_of_another_shape_and_its_memory():
    from conftest import ROOT, TINY
    from datasets.scenario import DataManager
    from methods import build_method, method_config
    from trainer.cli import parse_overrides as parse_cli_overrides
    from trainer.config_loader import load_config

    cfg = load_config(os.path.join(ROOT, "options", "icarl", "digits.yaml"), parse_cli_overrides(TINY), method_config)

    def fresh():
        method = build_method(cfg, DataManager(cfg, seed=1))
        method.begin_task(method.data.tasks[0])
        return method

    method = fresh()
    method.class_means = torch.nn.functional.normalize(torch.randn(5, 64), dim=1)
    method.memory.exemplars = {0: np.arange(3), 4: np.arange(7, 9)}
    restored = fresh()
    restored.load_state_dict(method.state_dict())
    restored.load_extra_state(method.extra_state())
    assert torch.equal(restored.class_means, method.class_means)
    assert {c: v.tolist() for c, v in restored.memory.exemplars.items()} == {0: [0, 1, 2], 4: [7, 8]}


def test_every_epoch_trains_in_train_mode_even_after_an_evaluation_left_the_method_in_eval_mode():
    method = Toy()
    method.norm = nn.BatchNorm1d(3)
    modes = []

    def step(x, y, i):
        modes.append((method.training, method.norm.training))
        return {"a": method.norm(x).sum() * 0 + method.w.sum()}

    method.eval()
    fit(method, step, n=8, epochs=2, batch_size=4)
    assert modes == [(True, True)] * 4


# ---- precision and the ranks' shares of a batch ----
def test_a_float64_engine_feeds_and_returns_float64_and_upcast_widens_only_half_precision():
    from utils.precision import default_dtype, upcast

    engine = Engine(torch.device("cpu"), dtype=torch.float64)
    assert engine.to_device(torch.ones(2)).dtype == torch.float64
    assert engine.to_device(torch.ones(2, dtype=torch.long)).dtype == torch.long
    with default_dtype("float64"):
        net = nn.Linear(1, 2)
    assert torch.get_default_dtype() == torch.float32 and net.weight.dtype == torch.float64
    out, _ = engine.infer(net, TensorDataset(torch.arange(4.0)[:, None], torch.zeros(4, dtype=torch.long)), net)
    assert out.dtype == torch.float64
    assert [upcast(torch.ones(1, dtype=d)).dtype for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)
            ] == [torch.float32, torch.float32, torch.float32, torch.float64]


def test_a_float64_run_trains_and_checkpoints_in_float64_and_restores_the_default(run_main):
    from conftest import ROOT, TINY

    results, folder = run_main("--config", os.path.join(ROOT, "options", "finetune_il", "digits.yaml"), *TINY,
                               "--img_size", "8", "--precision", "float64")
    assert torch.get_default_dtype() == torch.float32
    state = torch.load(os.path.join(folder, "checkpoints", "seed1_task1.pt"), weights_only=True)["method"]
    floats = {n: t.dtype for n, t in state.items() if t.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float64}, floats
    assert len(results["runs"][0]["acc_matrix"]) == 2


@pytest.mark.parametrize("n, batch_size", [(70, 33), (43, 8), (64, 32)])
def test_each_ranks_dataloader_batch_is_its_share_of_the_same_global_batch(n, batch_size):
    from trainer.engine.batches import SeededSampler

    def batches(rank, world):
        sampler = SeededSampler(n, True, False, batch_size, False, rank, world)
        sampler.set_epoch(7)
        return list(sampler)

    whole, ranks = batches(0, 1), [batches(r, 2) for r in range(2)]
    assert [len(b) for b in whole] == Engine(torch.device("cpu")).batches(range(n), batch_size, True).sizes()
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for step, batch in enumerate(whole):
        assert ranks[0][step] == batch[0::2] and ranks[1][step] == batch[1::2]


def test_the_run_seed_draws_the_initial_network_as_well_as_the_class_order():
    """A seed is a whole draw: class order, initial weights and batch orders (PyCIL's trainer seeds torch with 1
    for every seed, so its seeds share one initial network; docs/icarl_vs_pycil.md). The same seed rebuilds the
    same network; another seed gives other weights."""
    from conftest import ROOT, TINY
    from methods import method_config
    from trainer.task_loop import SeedRun
    from trainer.cli import parse_overrides as parse_cli_overrides
    from trainer.config_loader import load_config

    cfg = load_config(os.path.join(ROOT, "options", "icarl", "digits.yaml"), parse_cli_overrides(TINY), method_config)

    def initial(seed):
        run = SeedRun(cfg, seed, torch.device("cpu"))
        run.method.begin_task(run.data.tasks[0])
        return run.data.class_order, run.method.network.state_dict(), run.engine.seed

    order1, net1, engine1 = initial(1)
    torch.manual_seed(99)  # whatever the RNG was before, build reseeds it
    again, net1b, _ = initial(1)
    order2, net2, engine2 = initial(2)
    assert again == order1 and all(torch.equal(net1[k], net1b[k]) for k in net1)
    floats = [k for k in net1 if net1[k].is_floating_point() and net1[k].std() > 0]
    assert floats and all(not torch.equal(net1[k], net2[k]) for k in floats)
    assert (engine1, engine2) == (1, 2)  # the engine's batch orders are keyed by the run seed
