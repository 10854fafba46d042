"""Every command the README shows works as written: each `python main.py ...` (and `python -m trainer.summarize`,
`python -m datasets.check`) command is taken from README.md and run in process, in README order, in one scratch
folder that sees the repository's options/ (so a command may read what an earlier one wrote under a relative
path, such as a pretrained backbone).

Tiny settings are appended to training runs for the keys a command does not set itself (1 epoch, 8 px, 2 tasks on
the bundled digits and mnist5k, CPU, seed 1). Placeholders are filled in: `<method>`/`<dataset>` with finetune_il/digits, a path holding
`<run>` with the run folder of the previous run, `NAME`/`DIR` of datasets.check with digits and the data folder; a
template's `[--key value ...]` is dropped and an optional `[--flag value]` kept. A command whose dataset is not on
disk (only the bundled digits and mnist5k are, as $DATA points into the scratch folder) is skipped: its dataset's loader
raises the "not found" error before anything else. The figures are not drawn (tests/test_checkpoint.py checks
them); everything else a command does is."""
import glob
import os
import re
import shlex

import pytest

import main
from conftest import ROOT
from datasets import DATASETS
from datasets import check as dataset_check
from datasets.scenario import data_root
from methods import method_config
from trainer import cli, report, summarize
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config
from utils.registry import UserError

README = os.path.join(ROOT, "README.md")
TINY = {"--epochs": ["1"], "--init_epochs": ["1"], "--img_size": ["8"], "--device": ["cpu"], "--seed": ["1"]}
DIGITS_TINY = {"--init_cls": ["5"], "--increment": ["5"]}
BUNDLED = ("digits", "mnist5k")  # datasets an installed package ships: always on disk
MODULES = ("trainer.summarize", "datasets.check")


def readme_commands() -> list[str]:
    """`python main.py ...` / `python -m <module> ...` commands of README.md in document order: the lines of code
    blocks (after `&&`, without the `# comment`) and inline code spans; each once."""
    text = open(README, encoding="utf-8").read()
    found = []
    for block, inline in re.findall(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", text, flags=re.S):
        for line in block.splitlines() if block else [inline]:
            for part in line.split("&&"):
                found.append(part.split("  #")[0].split(" # ")[0].strip())
    wanted = re.compile(r"python (main\.py|-m (%s))( |$)" % "|".join(re.escape(m) for m in MODULES))
    commands = []
    for command in found:
        if wanted.match(command) and command not in commands:
            commands.append(command)
    return commands


def fill(command: str, scratch: str) -> list[str]:
    """The command's arguments with placeholders and optional parts resolved."""
    command = re.sub(r"\s*\[[^\]]*\.\.\.\]", "", command)  # template: [--key value ...]
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)  # optional part: keep it
    command = command.replace("<method>", "finetune_il").replace("<dataset>", "digits")
    argv = shlex.split(command)[2:]
    if argv and argv[0] in MODULES:
        argv = argv[1:]
    for i, arg in enumerate(argv):
        if "<run>" in arg:
            argv[i] = previous_run(scratch)
    return argv


def previous_run(scratch: str) -> str:
    runs = glob.glob(os.path.join(scratch, "logs", "**", "results.json"), recursive=True)
    assert runs, "a README command refers to <run> before any README command made a run"
    return os.path.dirname(max(runs, key=os.path.getmtime))


def with_tiny(argv: list[str]) -> tuple[list[str], object]:
    """Append the tiny settings for every key the command leaves to its config."""
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    cfg = load_config(argv[argv.index("--config") + 1] if "--config" in argv else None,
                      parse_cli_overrides(_without_own(argv)), method_config)
    extra = dict(TINY, **(DIGITS_TINY if cfg.dataset in BUNDLED else {}))
    if "vit" in str(cfg.backbone):
        extra["--img_size"] = ["16"]
    return argv + [t for k, v in extra.items() if k not in given for t in (k, *v)], cfg


def _without_own(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in cli.OWN:
            skip = cli.OWN[a] == 1
        else:
            out.append(a)
    return out


def dataset_present(cfg) -> bool:
    try:
        DATASETS.get(cfg.dataset)(**{k: getattr(cfg, k) for k in ("train_list", "test_list")
                                     if getattr(cfg, k) is not None}).load(data_root(cfg))
        return True
    except UserError:
        return False


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    commands = readme_commands()
    assert len(commands) >= 8, commands
    os.symlink(os.path.join(ROOT, "options"), tmp_path / "options")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA", str(tmp_path / "data"))
    monkeypatch.setattr(report, "plot", lambda *args, **kwargs: [])
    ran, skipped, seen = [], [], set()
    for command in commands:
        argv = fill(command, str(tmp_path))
        if "<run>" not in command and tuple(argv) in seen:
            continue  # a template that, filled in, is a command already run
        seen.add(tuple(argv))
        if command.startswith("python -m trainer.summarize"):
            rows = summarize.main(argv)
            assert rows, f"{command}: no finished run listed"
            ran.append(command)
            continue
        if command.startswith("python -m datasets.check"):
            argv = ["digits" if a == "NAME" else str(tmp_path / "data") if a == "DIR" else a for a in argv]
            assert dataset_check.main(argv) == 0, command
            ran.append(command)
            continue
        before = set(glob.glob(str(tmp_path / "logs" / "**" / "results*.json"), recursive=True))
        trains = not ({"--help", "-h", "--list", "--checkpoint_dir"} & set(argv))
        if trains:
            argv, cfg = with_tiny(argv)
            if not dataset_present(cfg):
                skipped.append(command)
                continue
        elif "--checkpoint_dir" in argv and "--device" not in argv:
            argv += ["--device", "cpu"]
        code = main.cli(argv)
        out = capsys.readouterr()
        assert code == 0, f"README command failed: {command}\n  run as {argv}\n  {out.err.strip()}"
        after = set(glob.glob(str(tmp_path / "logs" / "**" / "results*.json"), recursive=True))
        if trains:
            assert [p for p in after - before if p.endswith("results.json")], f"{command} wrote no results.json"
        elif "--checkpoint_dir" in argv:  # README's run is finished: it is re-tested
            folder = argv[argv.index("--checkpoint_dir") + 1]
            assert os.path.join(folder, "results_retest.json") in after - before, f"{command} re-tested nothing"
        else:
            assert out.out.strip(), f"{command} printed nothing"
        ran.append(command)
    assert len(ran) >= 9 and not [c for c in skipped if "digits" in c], (ran, skipped)
