"""main.py's command line, parsed in one place: main.py's own options (--config, --checkpoint_dir, --list,
--log_root, --debug, --strict, --help), and `--key value ...` for any config key, each value read as YAML (false, 1e-3,
[30, 60]; `--milestones 30 60` gives a list). Each own option may be given once and takes exactly its values; a
bare word that follows no key is a stray argument. Every problem is a `UserError` of one line. An argument is at
most `MAX_VALUE_CHARS` characters, and a value is read as YAML within the bounds a config file is
(`config_loader.load_yaml`: no alias bomb, no deep nesting)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from trainer.config_loader import MAX_VALUE_CHARS, load_yaml, type_name
from utils.config import GlobalConfig, declared_fields
from utils.registry import UserError, shorten

DESCRIPTION = """Train a continual-learning method task by task: python main.py --config options/<method>/<dataset>.yaml

Any config key can be overridden as --key value (lists: --milestones 30 60); --seed 1 2 3 runs several seeds.
python main.py --list methods|datasets|backbones prints the registered names; --help lists every key.
"""
#: main.py's own options and how many values each takes.
OWN = {"--config": 1, "--checkpoint_dir": 1, "--list": 1, "--log_root": 1, "--debug": 0, "--strict": 0, "--help": 0,
       "-h": 0}
LISTS = ("methods", "datasets", "backbones")


@dataclass
class CommandLine:
    config: str | None = None
    checkpoint_dir: str | None = None
    list: str | None = None
    log_root: str = "logs"
    debug: bool = False
    strict: bool = False  # a re-test that does not reproduce results.json is an error, not a warning
    help: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # config key -> value


def parse(argv: list[str]) -> CommandLine:
    """Split argv into main.py's own options and the config keys' values."""
    args, rest, seen = CommandLine(), [], set()
    for before, token in zip([None, *argv], argv):
        if len(token) > MAX_VALUE_CHARS:  # nothing longer is a key, a value or a path (PATH_MAX)
            what = f"the value of {shorten(before, 40)}" if before and before.startswith("--") else "an argument"
            raise UserError(f"command line: {what} ({shorten(token, 40)}) is longer than the "
                            f"{MAX_VALUE_CHARS:,} characters a value may have")
    i, after_key = 0, False
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        if name in OWN:
            canonical = "--help" if name == "-h" else name
            if canonical in seen:
                raise UserError(f"{canonical} is given twice; give it once")
            seen.add(canonical)
            dest = canonical[2:]
            if OWN[name] == 0:
                if eq:
                    raise UserError(f"{canonical} takes no value, got {shorten(token)}")
                setattr(args, dest, True)
                i, after_key = i + 1, False
                continue
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 2
            else:
                raise UserError(f"{canonical} needs a value")
            if value == "":
                raise UserError(f"{canonical} needs a value, got an empty string")
            setattr(args, dest, value)
            after_key = False
            if i < len(argv) and not argv[i].startswith("--"):
                raise UserError(f"unexpected argument {shorten(argv[i])} after {canonical} {shorten(value)} (it "
                                "takes one value); "
                                "keys are given as --key value")
            continue
        if token.startswith("--") and len(token) > 2:
            after_key = True
        elif not after_key:
            raise UserError(f"unexpected argument {shorten(token)} on the command line; keys are given as "
                            "--key value")
        rest.append(token)
        i += 1
    if args.list is not None and args.list not in LISTS:
        raise UserError(f"--list takes one of {', '.join(LISTS)}, got {shorten(args.list)}")
    args.overrides = parse_overrides(rest)
    return args


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key v` or `--key v1 v2 ...` pairs; each value is read as YAML (false, 1e-3, [30, 60])."""
    overrides: dict[str, Any] = {}
    name = None
    for token in tokens:
        if token.startswith("--") and len(token) > 2 and not _is_number(token):
            name, _, inline = token[2:].partition("=")
            overrides[name] = []  # a key given again replaces its earlier value (appended overrides win)
            if inline:
                overrides[name].append(inline)
        elif name is None:
            raise UserError(f"unexpected argument {shorten(token)} on the command line; keys are given as "
                            "--key value")
        else:
            overrides[name].append(token)
    parsed = {}
    for name, values in overrides.items():
        if not values:
            raise UserError(f"command line: --{name} needs a value")
        items = [_yaml_scalar(v, name) for v in values]
        parsed[name] = items[0] if len(items) == 1 else items
    return parsed


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _yaml_scalar(text: str, name: str) -> Any:
    if not text.strip() or any(ord(c) < 32 for c in text):
        return text  # kept as typed: YAML would read an empty value as null and fold a newline into a space
    try:
        return load_yaml(text, f"command line: --{name}")
    except yaml.YAMLError:
        return text


def help_text(method_configs: dict[str, Any]) -> str:
    """main.py's own options, then every config key with its type, default and meaning: the global keys, then
    each method's own."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False, prog="python main.py")
    parser.add_argument("--config", help="YAML file in the original's basic/special/options schema")
    parser.add_argument("--checkpoint_dir", help="run folder: resume it if unfinished, else re-test its saved models")
    parser.add_argument("--list", choices=LISTS, help="print registered names")
    parser.add_argument("--log_root", default="logs", help="where run folders are created (default: logs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--strict", action="store_true", help="with --checkpoint_dir of a finished run: a re-test "
                                                              "that finds other weights or other numbers than "
                                                              "results.json is an error, not a warning")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every config key")

    def table(cls):
        rows = []
        for f, tp in declared_fields(cls).values():
            default = "required" if f.metadata.get("required") else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory())
            choices, valid = f.metadata.get("choices"), f.metadata.get("range")
            extra = f" [{'|'.join(map(str, choices))}]" if choices else (f" (range {valid})" if valid else "")
            rows.append(f"  --{f.name:<20} {type_name(tp):<14} default {default!s:<12} {f.metadata.get('help', '')}"
                        f"{extra}")
        return rows

    lines = [parser.format_help(), "global keys (any of them in the YAML or as --key value):"] + table(GlobalConfig)
    for name, cls in sorted(method_configs.items()):
        if cls is not None:
            lines += ["", f"keys of method '{name}':"] + table(cls)
    return "\n".join(lines)
