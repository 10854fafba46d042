"""Bad input, faults and hostile files (issue 13): every case ends in one line on stderr with exit status 2, loses
nothing an earlier run wrote, and runs no code from data. One test (or parametrised group) per class of failure;
the runs are two digits tasks of one epoch at 8 px, sharing one finished run where they can."""
import errno
import fcntl
import glob
import json
import os
import pickle
import shutil
import tempfile

import numpy as np
import pytest
import torch

import main
from conftest import ROOT
from dataset_fixtures import FIXTURES
from datasets import DATASETS
from datasets import check as dataset_check
from trainer import guards, task_loop
from methods import METHODS, method_config
from trainer import checkpoint, report
from trainer.config_loader import load_config
from utils import safe_pickle
from utils.config import GlobalConfig, declared_fields
from utils.registry import UserError
from trainer.engine.engine import Engine, NonFiniteLoss, first_non_finite
from utils.types import OptimConfig, Stage, Task

DIGITS = os.path.join(ROOT, "options", "finetune_il", "digits.yaml")
TINY = ["--device", "cpu", "--seed", "1", "--epochs", "1", "--init_epochs", "1", "--init_cls", "5", "--increment",
        "5", "--img_size", "8"]


def fails(argv, capsys, root=None):
    """main.cli(argv) must exit 2 with one 'error: ' line on stderr; returns that line."""
    if root is not None and "--checkpoint_dir" not in argv:
        argv = [*argv, "--log_root", str(root)]
    code = main.cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, code, err)
    return err[0]


def files(folder) -> dict[str, bytes]:
    """Every file under `folder` with its content (a lock file aside): what 'nothing lost or rewritten' compares."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(path) and not path.endswith(".lock"):
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def run_folders(root) -> list[str]:
    return glob.glob(os.path.join(str(root), "*", "*", "*", "*"))


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The figures are tested elsewhere; here they would only cost time."""
    monkeypatch.setattr(report, "plot", lambda *args, **kwargs: [])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (checkpoints of both tasks) and its results; tests work on copies."""
    root = tmp_path_factory.mktemp("finished")
    plot, report.plot = report.plot, lambda *args, **kwargs: []
    try:
        main.main(["--config", DIGITS, *TINY, "--note", "base", "--log_root", str(root)])
    finally:
        report.plot = plot
    (run_dir,) = run_folders(root)
    with open(os.path.join(run_dir, "results.json")) as f:
        return run_dir, json.load(f)


def copy_run(finished, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(finished[0], target)
    return str(target)


def ckpt(run_dir, name):
    return os.path.join(run_dir, "checkpoints", name)


# ---- security -------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling it would create a file (a stand-in for any shell command)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_cifar_pickle_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": _Payload(str(marker)), b"fine_labels": [0]}, f, protocol=2)
    line = fails(["--method", "finetune_il", "--dataset", "cifar100", "--backbone", "resnet32", "--data_root",
                  str(tmp_path / "data"), *TINY], capsys, tmp_path / "logs")
    assert "refused" in line and str(folder / "train") in line
    assert dataset_check.main(["cifar100", "--data_root", str(tmp_path / "data")]) != 0
    out = capsys.readouterr()
    assert str(folder / "train") in out.out + out.err and str(folder / "test") in out.out + out.err
    assert not marker.exists() and not run_folders(tmp_path / "logs")


def test_safe_pickle_admits_the_real_formats_and_nothing_else(tmp_path):
    data = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2], b"names": [b"a", "b"],
            b"n": np.int64(3), b"x": 1.5, b"t": (None, True)}
    for protocol in (2, 4, 5):
        back = safe_pickle.loads(pickle.dumps(data, protocol=protocol))
        assert back[b"labels"] == [1, 2] and back[b"data"].tolist() == [[0, 1, 2], [3, 4, 5]]
    for hostile in (np.array([1, "x"], dtype=object), {b"f": os.getcwd}, [_Payload(str(tmp_path / "x"))],
                    {b"s": {1, 2}}):
        with pytest.raises(UserError, match="refused"):
            safe_pickle.loads(pickle.dumps(hostile, protocol=2), "f.pkl")
    with pytest.raises(UserError, match="cannot be read"):
        safe_pickle.loads(pickle.dumps(data)[:20], "f.pkl")
    assert not (tmp_path / "x").exists()


def test_safe_pickle_admits_exactly_the_globals_plain_data_needs():
    """The whole list of what a data file may name: numpy's array and scalar reconstructors (under numpy 1's and
    numpy 2's module names), ndarray, dtype and the latin-1 bytes encoder. One more entry is one more way in."""
    from numpy import dtype, ndarray

    allowed = safe_pickle.ALLOWED
    assert set(allowed) == {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                            ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    assert allowed[("numpy", "ndarray")] is ndarray and allowed[("numpy", "dtype")] is dtype
    for name in ("_reconstruct", "scalar"):
        assert allowed[("numpy.core.multiarray", name)] is allowed[("numpy._core.multiarray", name)]
        assert allowed[("numpy._core.multiarray", name)].__name__ == name
    assert allowed[("numpy.core.numeric", "_frombuffer")] is allowed[("numpy._core.numeric", "_frombuffer")]
    assert allowed[("numpy._core.numeric", "_frombuffer")].__name__ == "_frombuffer"
    assert allowed[("_codecs", "encode")]("é") == b"\xe9"
    with pytest.raises(pickle.UnpicklingError):
        allowed[("_codecs", "encode")]("x", "rot13")  # the encoder admits no other codec


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("os", "system"), ("builtins", "getattr"),
                                          ("numpy", "load"), ("numpy", "frombuffer"), ("_codecs", "decode"),
                                          ("collections", "OrderedDict"), ("numpy.core.multiarray", "array")])
def test_safe_pickle_refuses_any_other_global_before_calling_it(module, name):
    """A pickle that names a global outside the list (GLOBAL opcode, then calls it with no arguments) is refused,
    naming the global; nothing is called."""
    crafted = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    with pytest.raises(UserError, match=f"refused: it asks to call {module}.{name},"):
        safe_pickle.loads(crafted, "f.pkl")


@pytest.mark.parametrize("note", ["ABSOLUTE", "../../..", "..", ".", "a/b", "", "a\nb", "x\x00y"])
def test_note_must_be_a_plain_folder_name(note, tmp_path, capsys):
    note = str(tmp_path / "elsewhere") if note == "ABSOLUTE" else note
    line = fails(["--config", DIGITS, *TINY, "--note", note], capsys, tmp_path / "logs" / "a" / "b")
    assert "note" in line
    assert os.listdir(tmp_path) == [], "nothing is written, inside logs/ or outside"


# ---- divergence -----------------------------------------------------------------------------------------------

def rewound(finished, tmp_path) -> str:
    """A copy of the finished run as it was right after task 0 (latest.pt and results.json of task 0), so that
    resuming it trains task 1 only."""
    run_dir = copy_run(finished, tmp_path)
    shutil.copy(ckpt(run_dir, "seed1_task0.pt"), ckpt(run_dir, "seed1_latest.pt"))
    os.remove(ckpt(run_dir, "seed1_task1.pt"))
    results = dict(finished[1])
    results["runs"] = [dict(results["runs"][0], tasks=results["runs"][0]["tasks"][:1], complete=False)]
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f)
    return run_dir


def _blow_up_after_epochs_of_task_1(monkeypatch, value):
    """After the last step of every epoch of task 1, the weights blow up (the epoch's mean loss stays finite)."""
    epoch = Engine._epoch

    def patched(self, method, *args):
        means = epoch(self, method, *args)
        if method.task.index == 1:
            with torch.no_grad():
                for p in method.parameters():
                    p.mul_(value) if value != float("inf") else p.fill_(value)
        return means

    monkeypatch.setattr(Engine, "_epoch", patched)


def test_a_diverged_model_is_never_saved_or_recorded(finished, tmp_path, capsys, monkeypatch):
    """Weights of 5e29 are finite, but the model predicts inf/NaN: results.json and latest.pt stay as they were
    after task 0, and the run resumes from there to the numbers of the run that never diverged."""
    run_dir = rewound(finished, tmp_path)
    before = files(run_dir)
    _blow_up_after_epochs_of_task_1(monkeypatch, 5e29)
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert "task 1" in line and "non-finite" in line
    after = files(run_dir)
    assert {k: after[k] for k in before if k != "run.log"} == {k: v for k, v in before.items() if k != "run.log"}
    assert set(after) - set(before) <= {"run.log"}, "no task checkpoint of the diverged model"
    monkeypatch.undo()
    assert main.cli(["--checkpoint_dir", run_dir]) == 0
    with open(os.path.join(run_dir, "results.json")) as f:
        assert json.load(f)["runs"][0]["acc_matrix"] == finished[1]["runs"][0]["acc_matrix"]


def test_the_save_check_names_where_the_model_diverged():
    """A checkpoint inside a stage (checkpoint_every) of a model with finite but blown-up weights is refused,
    naming the task, stage and epoch; so is one with a non-finite buffer."""
    cfg = load_config(DIGITS, {"device": "cpu", "seed": [1], "img_size": 8, "init_cls": 5, "increment": 5},
                      method_config)
    run = task_loop.SeedRun(cfg, 1, torch.device("cpu"))
    data, method, engine = run.data, run.method, run.engine
    for task in data.tasks:
        method.begin_task(task)
    where = {"task": 1, "done": False, "stage": "train", "epoch": 3}
    guards.check_finite(method, engine, data, where)  # a sound model passes
    with torch.no_grad():
        for p in method.parameters():
            p.mul_(5e29)
    with pytest.raises(UserError, match="in task 1, stage 'train', epoch 3"):
        guards.check_finite(method, engine, data, where)
    with torch.no_grad():
        for p in method.parameters():
            p.div_(5e29)
    next(b for n, b in method.named_buffers() if n.endswith("running_var")).fill_(float("nan"))
    with pytest.raises(UserError, match="running_var"):
        guards.check_finite(method, engine, data, dict(where, done=True))


def test_non_finite_weights_stop_naming_task_stage_and_epoch(finished, tmp_path, capsys, monkeypatch):
    run_dir = rewound(finished, tmp_path)
    latest = files(run_dir)["checkpoints/seed1_latest.pt"]
    _blow_up_after_epochs_of_task_1(monkeypatch, float("inf"))
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert files(run_dir)["checkpoints/seed1_latest.pt"] == latest
    assert "task 1" in line and "stage 'train'" in line and "epoch 1" in line


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


class _Guarded(torch.nn.Module):
    """A parameter, a floating and an integer buffer, a loss and a classifier's scores that a test sets: what the
    divergence guards look at. The loss has a zero gradient, so a non-finite loss leaves the weights finite;
    `on_step` changes the weights after the backward pass, so non-finite weights leave this step's loss finite."""

    def __init__(self, loss=0.0, scores=(0.0, 1.0)):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("stat", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.loss, self.scores, self.on_step = loss, torch.tensor(scores), lambda: None

    def before_optimizer_step(self):  # after the backward pass: the loss stays finite
        with torch.no_grad():
            self.on_step()

    def step(self, x, y):
        return {"loss": (self.w * 0.0).sum() + self.loss}

    def predict(self, x):
        return {"cnn": self.scores.expand(len(x), -1).clone(), "task_id": torch.zeros(len(x), dtype=torch.long)}


class _Data:
    """The part of a data manager `guards.check_finite` reads: one task of two classes, four test images."""

    tasks = [Task(0, 0, 2, 1)]

    def indices(self, split, classes):
        return np.arange(4)

    def dataset(self, split, indices):
        return [(torch.zeros(3), 0) for _ in indices]


def _fit(model):
    """One epoch of one step of `model.step` through the engine (float32, no autocast)."""
    data = torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    stage = Stage("train", lambda: data, OptimConfig(epochs=1, lrate=0.1, batch_size=4), model.step)
    return Engine(torch.device("cpu"), amp=False).fit(model, Task(0, 0, 2, 1), stage)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", ["w", "stat"])
def test_first_non_finite_names_a_parameter_or_floating_buffer_holding_any_non_finite_value(value, where):
    model = _Guarded()
    assert first_non_finite(model) is None
    getattr(model, where).data[1] = value
    assert first_non_finite(model) == where


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "+inf", "-inf"])
def test_training_stops_on_every_kind_of_non_finite_loss(value):
    """The loss is NaN, +inf or -inf while the weights stay finite: only the loss check can stop the stage."""
    model = _Guarded()
    assert _fit(model) == {"loss": 0.0}
    model.loss = value
    with pytest.raises(NonFiniteLoss, match="loss"):
        _fit(model)
    assert first_non_finite(model) is None


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", ["w", "stat"])
def test_training_stops_on_every_kind_of_non_finite_parameter_or_buffer(value, where):
    model = _Guarded()
    model.on_step = lambda: getattr(model, where).data.__setitem__(0, value)
    with pytest.raises(NonFiniteLoss, match=f"'{where}'"):
        _fit(model)


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", ["w", "stat", "scores"])
def test_the_save_check_refuses_non_finite_weights_and_nan_or_plus_inf_scores_but_not_minus_inf(value, where):
    """Weights and floating buffers: NaN, +inf and -inf are all refused. Scores: NaN and +inf come from a diverged
    model and are refused; -inf is a legitimate mask (a class a method rules out) and passes, even a whole row."""
    model, engine, data = _Guarded(), Engine(torch.device("cpu"), amp=False), _Data()
    where_done = {"task": 0, "done": True}
    guards.check_finite(model, engine, data, where_done)
    getattr(model, where).data[0] = value
    if where == "scores" and value == float("-inf"):
        guards.check_finite(model, engine, data, where_done)
        model.scores.fill_(value)
        guards.check_finite(model, engine, data, where_done)
    else:
        with pytest.raises(NonFiniteLoss, match="after task 0"):
            guards.check_finite(model, engine, data, where_done)


def test_refuse_non_finite_is_per_key_on_floating_scores_only():
    ok = {"cnn": torch.tensor([[0.0, -float("inf")], [-float("inf"), -float("inf")]]),
          "task_id": torch.tensor([0, 1]), "nme": torch.tensor([[1e30, -1e30]])}
    guards.refuse_non_finite(ok, "after task 0")
    for value in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteLoss, match="'nme'"):
            guards.refuse_non_finite(dict(ok, nme=torch.tensor([[1.0, value]])), "after task 0")


# ---- re-test trusts nothing it did not check -------------------------------------------------------------------

def _edit(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _first_weight(state):
    return next(k for k in state["method"] if k.endswith("conv1.0.weight"))


def _other_config(run_dir):
    """Checkpoints of a run of another config with the same architecture (here: another learning rate)."""
    for name in os.listdir(os.path.join(run_dir, "checkpoints")):
        _edit(ckpt(run_dir, name), lambda s: s["config"].__setitem__("lrate", 0.05))


RETEST_CASES = {
    "other config": _other_config,
    "no checkpoints": lambda run_dir: shutil.rmtree(os.path.join(run_dir, "checkpoints")),
    "class_means shape": lambda run_dir: _edit(
        ckpt(run_dir, "seed1_task1.pt"), lambda s: s["method"].__setitem__("class_means", torch.zeros(3, 64))),
    "tensor shape": lambda run_dir: _edit(
        ckpt(run_dir, "seed1_task0.pt"), lambda s: s["method"].__setitem__(_first_weight(s), torch.zeros(2))),
    "missing key": lambda run_dir: _edit(ckpt(run_dir, "seed1_task0.pt"),
                                                lambda s: s["method"].pop(_first_weight(s))),
    "extra key": lambda run_dir: _edit(ckpt(run_dir, "seed1_task0.pt"),
                                              lambda s: s["method"].__setitem__("branch.2.weight", torch.zeros(1))),
    "nan weights": lambda run_dir: _edit(ckpt(run_dir, "seed1_task0.pt"), lambda s: s["method"][
        _first_weight(s)].fill_(float("nan"))),
    "seed swapped": lambda run_dir: _edit(ckpt(run_dir, "seed1_task0.pt"), lambda s: s.__setitem__("seed", 2)),
    "task swapped": lambda run_dir: shutil.copy(ckpt(run_dir, "seed1_task0.pt"), ckpt(run_dir, "seed1_task1.pt")),
}


@pytest.mark.parametrize("case", RETEST_CASES)
def test_retest_refuses_checkpoints_it_cannot_trust(case, finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path)
    RETEST_CASES[case](run_dir)
    before = files(run_dir)
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert case == "no checkpoints" or os.path.join(run_dir, "checkpoints") in line
    assert {k: v for k, v in files(run_dir).items() if k != "run.log"} == \
           {k: v for k, v in before.items() if k != "run.log"}, "nothing is written but the log line"


def test_retest_says_which_tasks_were_retested(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    os.remove(ckpt(run_dir, "seed1_task0.pt"))
    assert main.cli(["--checkpoint_dir", run_dir]) == 0
    with open(os.path.join(run_dir, "results_retest.json")) as f:
        record = json.load(f)["runs"][0]
    assert [t["retested"] for t in record["tasks"]] == [False, True] and record["retested_tasks"] == [1]
    assert record["acc_matrix"] == finished[1]["runs"][0]["acc_matrix"]


# ---- resume never overwrites what it does not continue from ----------------------------------------------------

def test_resume_without_latest_continues_from_the_newest_task_checkpoint(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    os.remove(ckpt(run_dir, "seed1_latest.pt"))
    os.remove(ckpt(run_dir, "seed1_task1.pt"))
    os.remove(os.path.join(run_dir, "results.json"))
    task0 = files(run_dir)["checkpoints/seed1_task0.pt"]
    assert main.cli(["--checkpoint_dir", run_dir]) == 0
    assert files(run_dir)["checkpoints/seed1_task0.pt"] == task0, "task0.pt is not rewritten"
    with open(os.path.join(run_dir, "results.json")) as f:
        assert json.load(f)["runs"][0]["acc_matrix"] == finished[1]["runs"][0]["acc_matrix"]


def test_truncated_latest_falls_back_to_the_newest_intact_task_checkpoint(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(run_dir, "results.json"))
    with open(ckpt(run_dir, "seed1_latest.pt"), "r+b") as f:
        f.truncate(100)
    with open(ckpt(run_dir, "seed1_task0.pt"), "r+b") as f:
        f.truncate(100)  # an older task checkpoint being broken does not matter: the newest intact one is used
    assert main.cli(["--checkpoint_dir", run_dir]) == 0
    with open(os.path.join(run_dir, "results.json")) as f:
        assert json.load(f)["runs"][0]["acc_matrix"] == finished[1]["runs"][0]["acc_matrix"]


def test_resume_refuses_to_start_over_a_seed_that_wrote_results(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path)
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    results["runs"][0]["complete"], results["runs"][0]["tasks"] = False, results["runs"][0]["tasks"][:1]
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f)
    os.remove(ckpt(run_dir, "seed1_latest.pt"))
    os.remove(ckpt(run_dir, "seed1_task1.pt"))
    with open(ckpt(run_dir, "seed1_task0.pt"), "r+b") as f:
        f.truncate(100)
    before = files(run_dir)
    assert "seed1_task0.pt" in fails(["--checkpoint_dir", run_dir], capsys)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    assert "results.json holds 1 task" in fails(["--checkpoint_dir", run_dir], capsys)
    after = files(run_dir)
    assert {k: v for k, v in after.items() if k != "run.log" and "checkpoints" not in k} == \
           {k: v for k, v in before.items() if k != "run.log" and "checkpoints" not in k}


class _Started(Exception):
    pass


def test_resume_before_task_0_finished_keeps_config_yaml(finished, tmp_path, monkeypatch):
    run_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(run_dir, "results.json"))
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    config = files(run_dir)["config.yaml"]

    def started(*args, **kwargs):
        raise _Started

    monkeypatch.setattr(task_loop.SeedRun, "train", started)  # config.yaml is written, if at all, before training
    with pytest.raises(_Started):
        main.main(["--checkpoint_dir", run_dir, "--device", "cpu", "--num_workers", "0"])
    assert files(run_dir)["config.yaml"] == config


def test_a_crafted_checkpoint_is_refused_not_skipped(finished, tmp_path, capsys):
    """A truncated latest.pt is skipped for an older checkpoint; one crafted to run code stops the resume."""
    run_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(run_dir, "results.json"))
    marker = tmp_path / "PWNED"
    torch.save({"version": 1, "config": _Payload(str(marker))}, ckpt(run_dir, "seed1_latest.pt"))
    before = files(run_dir)
    assert "refused" in fails(["--checkpoint_dir", run_dir], capsys)
    assert not marker.exists() and files(run_dir) == before


def test_resume_refuses_a_checkpoint_that_does_not_fit(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(run_dir, "results.json"))
    _edit(ckpt(run_dir, "seed1_latest.pt"), lambda s: s["method"].__setitem__(_first_weight(s), torch.zeros(2)))
    before = files(run_dir)
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert "seed1_latest.pt" in line and "conv1.0.weight" in line
    assert files(run_dir) == before


def test_resume_refuses_an_optimizer_state_that_does_not_fit(finished, tmp_path, capsys):
    """A checkpoint inside task 1's stage whose momentum buffers fit none of the network's parameters."""
    run_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(run_dir, "results.json"))
    task0, task1 = (torch.load(ckpt(run_dir, f"seed1_task{t}.pt"), weights_only=True) for t in (0, 1))
    inside = dict(task0, position={"task": 1, "done": False, "stage": "train", "epoch": 1}, scheduler=None,
                  method=dict(task1["method"], class_means=task0["method"]["class_means"]),
                  optimizer={"state": {0: {"momentum_buffer": torch.zeros(7, 7)}}, "param_groups": [{"params": [0]}]})
    torch.save(inside, ckpt(run_dir, "seed1_latest.pt"))
    before = files(run_dir)
    assert "optimizer state" in fails(["--checkpoint_dir", run_dir], capsys)
    assert files(run_dir) == before


# ---- two processes, temporary files, full disks ----------------------------------------------------------------

def test_a_second_process_on_a_run_folder_gets_one_line(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path)
    os.remove(os.path.join(run_dir, "results.json"))
    holder = os.open(os.path.join(run_dir, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: as good as another process
    try:
        before = files(run_dir)
        assert "in use by another process" in fails(["--checkpoint_dir", run_dir], capsys)
        assert files(run_dir) == before
    finally:
        os.close(holder)
    with open(os.path.join(run_dir, ".lock"), "w") as f:
        f.write("999999999")  # the lock file of a dead process: no lock is held on it
    assert main.cli(["--checkpoint_dir", run_dir]) == 0


def test_temporary_files_are_unique_fsynced_and_cleaned_up(tmp_path, monkeypatch):
    names, synced = [], []
    mkstemp, fsync = tempfile.mkstemp, os.fsync
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (lambda fd_name: (names.append(fd_name[1]), fd_name)[1])(
        mkstemp(**kw)))
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    path = str(tmp_path / "seed1_latest.pt")
    checkpoint.save(path, {"a": 1})
    checkpoint.save(path, {"a": 2})
    assert len(set(names)) == 2 and f"{path}.tmp" not in names and synced
    assert torch.load(path, weights_only=True)["a"] == 2 and os.listdir(tmp_path) == ["seed1_latest.pt"]


@pytest.mark.parametrize("target", ["torch.save", "json.dump"])
def test_a_full_disk_keeps_the_previous_files(target, finished, tmp_path, capsys, monkeypatch):
    """The disk fills up while task 1's checkpoint (or results.json) is written: one line naming the file, the
    previous files intact, no temporary file left behind."""
    run_dir = rewound(finished, tmp_path) if target == "torch.save" else copy_run(finished, tmp_path)
    if target == "json.dump":  # the run is finished but results.json lost its last task: resuming rewrites it
        rewritten = dict(finished[1], runs=[dict(finished[1]["runs"][0], tasks=finished[1]["runs"][0]["tasks"][:1],
                                                 complete=False)])
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(rewritten, f)
    before = files(run_dir)
    module, name = target.split(".")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(__import__(module), name, full)
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert "No space left on device" in line and run_dir in line
    monkeypatch.undo()
    after = files(run_dir)
    assert {k: v for k, v in after.items() if k != "run.log"} == {k: v for k, v in before.items() if k != "run.log"}
    assert not glob.glob(os.path.join(run_dir, "**", ".*.tmp"), recursive=True)


def test_unwritable_log_roots(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in fails(["--config", DIGITS, *TINY, "--log_root", str(a_file)], capsys)
    assert "Not a directory" in fails(["--config", DIGITS, *TINY, "--log_root", str(a_file / "sub")], capsys)

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(os, "mkdir", read_only)
    assert "Permission denied" in fails(["--config", DIGITS, *TINY], capsys, tmp_path / "ro")
    assert a_file.read_text() == "x"


# ---- one-line errors, validated before anything is written -----------------------------------------------------

BAD_VALUES = {  # the values, and what the one line must name
    "--lrate -1": "'lrate'", "--lrate 0": "'lrate'", "--lrate nan": "'lrate'", "--weight_decay -1": "'weight_decay'",
    "--opt_mom -1": "'opt_mom'", "--seed -1": "'seed'", "--seed 4294967296": "'seed'", "--seed 1 1": "seed 1",
    "--class_order_seed -1": "'class_order_seed'", "--img_size -3": "'img_size'", "--img_size 0": "'img_size'",
    "--img_size 1": "'img_size'", "--img_size 3": "'img_size'",
    "--epochs 0": "'epochs'", "--init_epochs 0": "'init_epochs'", "--replay_batch_size 0": "'replay_batch_size'",
    "--lrate_decay -0.1": "'lrate_decay'", "--milestones 5 -1": "'milestones'",
    "--init_milestones 0": "'init_milestones'", "--fixed_memory true --memory_per_class 0": "'memory_per_class'",
    "--fixed_memory true --memory_size 5": "memory_size",
    "--init_lrate -1": "'init_lrate'", "--num_workers -1": "'num_workers'", "--epochs 1 stray": "'stray'",
    "--init_cls 20": "init_cls", "--method acl": "layer_names", "--T 0": "'T'",  # dataset, method and method-key checks
}


@pytest.mark.parametrize("values", BAD_VALUES)
def test_bad_values_fail_before_a_run_folder_exists(values, tmp_path, capsys):
    config = os.path.join(ROOT, "options", "icarl", "digits.yaml") if values.startswith("--T") else DIGITS
    line = fails(["--config", config, *TINY, *values.split()], capsys, tmp_path)
    assert BAD_VALUES[values] in line
    assert os.listdir(tmp_path) == [], "no run folder, not even an empty one"


def test_every_numeric_key_declares_its_range_and_help_shows_it(capsys):
    classes = [GlobalConfig] + [method_config(m) for m in METHODS.keys() if method_config(m) is not None]
    for cls in classes:
        for name, (f, tp) in declared_fields(cls).items():
            numeric = {int, float} & {tp, *getattr(tp, "__args__", ())}
            if numeric and f.metadata.get("choices") is None:
                assert f.metadata.get("range") is not None, f"{cls.__name__}.{name} declares no range"
    assert main.cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert "(range (0, inf))" in out and "(range [0, 4294967295])" in out


def test_config_files_and_arguments(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("basic:\n  method: finetune_il  # caf\xe9\n".encode("latin-1"))
    assert "not a UTF-8" in fails(["--config", str(latin)], capsys, tmp_path)
    text = open(DIGITS).read()
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text(text.replace("  memory_size: 200\n", "  memory_size: 200\n  memory_size: 100\n"))
    assert "duplicate key 'memory_size'" in fails(["--config", str(duplicate)], capsys, tmp_path)
    assert "--config is given twice" in fails(["--config", DIGITS, "--config", DIGITS], capsys, tmp_path)
    assert "is a folder" in fails(["--config", os.path.join(ROOT, "options")], capsys, tmp_path)
    assert "is a file" in fails(["--checkpoint_dir", DIGITS], capsys)
    assert "unexpected argument 'stray'" in fails(["stray", "--config", DIGITS], capsys, tmp_path)
    assert "unexpected argument 'stray'" in fails(["--config", DIGITS, "stray", *TINY], capsys, tmp_path)
    assert "--list takes one of" in fails(["--list", "bogus"], capsys)
    assert sorted(os.listdir(tmp_path)) == ["dup.yaml", "latin.yaml"]


def test_checkpoint_and_weight_files_that_do_not_fit(tmp_path, capsys):
    text = tmp_path / "weights.pth"
    text.write_text("not weights")
    assert str(text) in fails(["--config", DIGITS, *TINY, "--pretrained", "true", "--pretrain_path", str(text)],
                              capsys, tmp_path / "logs")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    line = fails(["--config", DIGITS, *TINY, "--pretrained", "true", "--pretrain_path", str(wrong)], capsys,
                 tmp_path / "logs")
    assert str(wrong) in line and "conv1.0.weight" in line
    assert not os.path.exists(tmp_path / "logs")


def test_datasets_check_lists_every_unreadable_file(tmp_path):
    FIXTURES["skin23"](str(tmp_path))
    broken = sorted(glob.glob(str(tmp_path / "skin23" / "test" / "*" / "*.jpg")))[:3]
    for path in broken:
        with open(path, "wb") as f:
            f.write(b"not a jpeg")
    report = dataset_check.check("skin23", str(tmp_path), workers=2)
    assert all(path in "\n".join(report.problems) for path in broken)
