"""Shared test helpers: run main.py in-process on tiny settings and read the files it writes."""
import glob
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# one torch thread per pytest-xdist worker (pytest.ini runs two), two when the suite runs in one process
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

# Two tiny digits tasks, one epoch: what every method must survive in the registry-wide tests.
TINY = ["--device", "cpu", "--seed", "1", "--epochs", "1", "--init_epochs", "1", "--init_cls", "5",
        "--increment", "5", "--img_size", "16"]


@pytest.fixture
def run_main(tmp_path):
    """Call main.main(argv) with run output under tmp_path; returns (results.json contents, run folder)."""
    import main
    from trainer.results import read_results

    def _run(*argv):
        run_dir = main.main([*argv, "--log_root", str(tmp_path / "logs")])
        return read_results(run_dir), run_dir

    return _run


def run_stage(method, engine, task, name, new_data, **changes):
    """Run the method's stage `name` of `task` through the shared loop, with `changes` to the Stage (for example
    `data=lambda: subset` or `optim=OptimConfig(...)`); returns its last epoch's mean losses."""
    import dataclasses

    stage = next(s for s in method.stages(task, new_data, engine.infer) if s.name == name)
    return engine.fit(method, task, dataclasses.replace(stage, **changes))


# ---- known-answer tests: a marker, and its collection over every test file ----
def known_answer(*methods: str):
    """Mark a test as a known-answer test of the registered methods `methods`: it recomputes a loss or a
    prediction of theirs from the paper's formula written out in the test. `tests/test_methods.py` fails for any
    registered method that no test of any `tests/test_*.py` file marks so."""
    return pytest.mark.known_answer(*methods)


def pytest_configure(config):
    config.addinivalue_line("markers", "known_answer(*methods): a known-answer test of the named methods")
    config.addinivalue_line("markers", "precision: run in float32 and under bfloat16 autocast (precision_mode)")


# ---- precision: the reduced-precision path tested on every machine ----
PRECISIONS = ("float32", "bfloat16")


def pytest_generate_tests(metafunc):
    """Known-answer tests and tests marked `precision` run twice: in float32 and under bfloat16 autocast."""
    if any(m.name in ("known_answer", "precision") for m in metafunc.definition.iter_markers()):
        metafunc.parametrize("precision_mode", PRECISIONS, indirect=True)


@pytest.fixture(autouse=True)
def precision_mode(request, monkeypatch):
    """The precision a test runs in. Unparametrized (None): whatever the engine chooses on this machine.
    "float32": autocast off (CL_AUTOCAST=off, trainer/engine/fastpath.py). "bfloat16": bfloat16 autocast forced,
    emulated where the CPU has no bfloat16 instructions (CL_AUTOCAST=bfloat16), in the engine and around the test
    body, so that a test recomputes its reference from the very outputs the method computed."""
    mode = getattr(request, "param", None)
    if mode is None:
        yield None
        return
    monkeypatch.setenv("CL_AUTOCAST", "off" if mode == "float32" else "bfloat16")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bfloat16"):
        yield mode


def known_answer_methods() -> dict[str, list[str]]:
    """method -> the known-answer tests ('file::test') that mark it, over every tests/test_*.py module."""
    import importlib
    import inspect

    found: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        module = importlib.import_module(name)
        items = [(n, o) for n, o in vars(module).items() if n.startswith("test") and callable(o)]
        for cls_name, cls in [(n, o) for n, o in vars(module).items() if n.startswith("Test") and inspect.isclass(o)]:
            items += [(f"{cls_name}::{n}", o) for n, o in vars(cls).items() if n.startswith("test") and callable(o)]
            items += [(cls_name, cls)]
        for test, obj in items:
            for mark in getattr(obj, "pytestmark", []):
                if mark.name == "known_answer":
                    for method in mark.args:
                        found.setdefault(method, []).append(f"{name}.py::{test}")
    return found
