"""The command line: listing, help, device resolution and one-line errors with a non-zero exit."""
import os
import subprocess
import sys

import pytest
import torch

import main
from backbone import BACKBONES
from conftest import ROOT
from datasets import DATASETS
from methods import METHODS
from trainer import cli
from trainer.device import resolve_device
from utils.registry import Registry, UserError

DIGITS = os.path.join(ROOT, "options", "finetune_il", "digits.yaml")


@pytest.mark.parametrize("what, registry", [("methods", METHODS), ("datasets", DATASETS), ("backbones", BACKBONES)])
def test_list_prints_registered_names(what, registry, capsys):
    assert main.cli(["--list", what]) == 0
    assert capsys.readouterr().out.split() == registry.keys()


def test_help_lists_global_and_method_keys(capsys):
    assert main.cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--init_epochs" in out and "--memory_size" in out
    lrate = next(line for line in out.splitlines() if line.strip().startswith("--lrate "))
    assert "(range (0, inf))" in lrate


@pytest.mark.parametrize("argv", [
    ["--config", "missing.yaml"],
    ["--config", DIGITS, "--method", "finetune"],
    ["--config", DIGITS, "--dataset", "digitz"],
    ["--config", DIGITS, "--backbone", "resnet_18"],
    ["--config", DIGITS, "--epochs", "two"],
    ["--config", DIGITS, "--lrat", "0.1"],
    ["--config", DIGITS, "--init_cls", "20"],
    ["--config", DIGITS, "--increment", "0"],
    ["--config", DIGITS, "--memory_size", "-5"],
    ["--config", DIGITS, "--device", "0,1"],
    ["--config", DIGITS, "--device", "gpu7"],
    ["--config", DIGITS, "--checkpoint_dir", "nowhere"],
    ["--config", DIGITS, "--dataset", "cifar100", "--data_root", "/nonexistent", "--backbone", "resnet32"],
    ["--config", DIGITS, "--config", DIGITS],
    ["--config", DIGITS, "extra.yaml"],
    ["stray", "--config", DIGITS],
    ["--config", DIGITS, "--debug=1"],
    ["--list", "bogus"],
    ["--config"],
    ["--config", DIGITS, "--lrate", "-1"],
    ["--config", DIGITS, "--note", "../x"],
])
def test_bad_input_is_one_line_and_exit_2(argv, tmp_path, capsys):
    code = main.cli([*argv, "--log_root", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert not os.path.exists(tmp_path / "logs"), "nothing is written for bad input"


def test_own_options_and_config_keys_are_split():
    args = cli.parse(["--config", "a.yaml", "--lrate", "-1", "--milestones", "3", "6", "--log_root=x", "--debug",
                      "--seed", "1"])
    assert (args.config, args.log_root, args.debug) == ("a.yaml", "x", True)
    assert args.overrides == {"lrate": -1, "milestones": [3, 6], "seed": 1}
    with pytest.raises(UserError, match="given twice"):
        cli.parse(["--log_root", "a", "--log_root", "b"])
    with pytest.raises(UserError, match="unexpected argument 'x'"):
        cli.parse(["--debug", "x"])


def test_unknown_names_suggest_the_closest():
    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        BACKBONES.get("resnet_18")
    registry = Registry("thing")
    registry.register("alpha")(object)
    with pytest.raises(KeyError):
        registry.register("alpha")(object)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("0")
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(UserError, match="one process per GPU"):  # main.py launches them
        resolve_device("0,1")
    with pytest.raises(UserError, match="twice"):
        resolve_device("0,0")


def test_entry_point_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
