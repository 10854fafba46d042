"""Reading a run's configuration: a YAML file of the original's schema (utils/config.py) and command-line
overrides, resolved strictly into a `Config`.

Precedence: command line > special > options[dataset][backbone] > basic > declared default. The options block
is chosen with the dataset/backbone *after* command-line overrides (the original chose it before them).

An unknown key, a wrong type or a missing required key raises `UserError` naming the file, the key and the
closest valid key; a value outside its declared range or choices is an error naming where it came from; keys of
the original that we do not support raise an error that says why. The method's keys become an instance of its
config dataclass (whose own checks, if any, run then).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from utils.config import DROPPED, Config, GlobalConfig, declared_fields
from utils.registry import UserError, closest

SECTIONS = ("basic", "special", "options")


def type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, where: str, name: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, bool, str, list[...], Optional[...])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, next(a for a in args if a is not type(None)), where, name)
    if origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(v, args[0], where, name) for v in items]
    if isinstance(value, (list, tuple)):
        if where == "command line":
            stray = " ".join(map(str, value[1:]))
            raise UserError(f"command line: --{name} takes one value, got {len(value)}: "
                            f"{' '.join(map(str, value))} (is '{stray}' a stray argument?)")
        raise UserError(f"{where}: key '{name}' takes one value ({type_name(tp)}), got a list {list(value)!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
            return str(value).lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"{where}: key '{name}' must be {type_name(tp)}, got {value!r}")


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML lets the last one silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the mapping's own keys; merged ones (<<: *anchor) may be overridden
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = self.construct_object(key_node, deep=deep)
            duplicate = name in seen
            seen.add(name)
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{name}'", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict:
    if os.path.isdir(path):
        raise UserError(f"config file '{path}' is a folder; give a .yaml file such as "
                        "options/finetune_il/digits.yaml")
    if not os.path.exists(path):
        raise UserError(f"config file '{path}' does not exist")
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' is not a regular file; give a .yaml file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise UserError(f"config file '{path}' cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file (byte 0x{raw[err.start]:02x} at offset {err.start}); save "
                        "the config as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None)
        if problem and problem.startswith("duplicate key"):
            raise UserError(f"{path}: {problem}{line}; each key may appear once per section") from None
        raise UserError(f"{path}: malformed YAML{line}" + (f" ({problem})" if problem else "")) from None
    if data is None:
        raise UserError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    for section in data:
        if section not in SECTIONS:
            raise UserError(f"{path}: unknown section '{section}'{closest(section, SECTIONS)}; "
                            f"sections are {', '.join(SECTIONS)}")
        if data[section] is not None and not isinstance(data[section], dict):
            raise UserError(f"{path}: section '{section}' must be a mapping")
    for section in ("basic", "special"):
        for name in data.get(section) or {}:
            if not isinstance(name, str):
                raise UserError(f"{path}: key {name!r} under {section}: is not a name")
    return {s: data.get(s) or {} for s in SECTIONS}


def load_config(path: str | None, cli: dict[str, Any], method_keys=None) -> Config:
    """Resolve the config from a YAML file and command-line overrides.

    `method_keys(name)` returns the method's config dataclass (None when it has none); it is looked up after
    the method name is known, so each method's keys are only valid for that method.
    """
    sections = _read_yaml(path) if path else {s: {} for s in SECTIONS}
    where = path or "command line"
    basic, special = sections["basic"], sections["special"]

    def pick(name):
        for layer in (cli, special, basic):
            if layer.get(name) is not None:
                return layer[name]
        return None

    method = pick("method")
    if method is None:
        raise UserError(f"{where}: missing required key 'method' (under basic:)")
    method_cls = method_keys(str(method)) if method_keys else None
    fields = {**declared_fields(GlobalConfig), **declared_fields(method_cls)}

    dataset, backbone = pick("dataset"), pick("backbone")
    options = sections["options"]
    block = {}
    if options:
        by_dataset = options.get(dataset)
        if not isinstance(by_dataset, dict) or not isinstance(by_dataset.get(backbone), dict):
            available = [f"{d}/{b}" for d, v in options.items() if isinstance(v, dict) for b in v]
            raise UserError(f"{where}: options has no block for dataset '{dataset}' and backbone '{backbone}'; "
                            f"blocks: {', '.join(available) or 'none'}")
        block = by_dataset[backbone]

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    layers = ((basic, f"{where} (basic)"), (block, f"{where} (options.{dataset}.{backbone})"),
              (special, f"{where} (special)"), (cli, "command line"))
    for layer, origin in layers:
        for name, value in layer.items():
            if name in DROPPED:
                raise UserError(f"{origin}: key '{name}' is not supported: {DROPPED[name]}")
            if name not in fields:
                raise UserError(f"{origin}: unknown key '{name}'{closest(name, fields)} for method '{method}'; "
                                "python main.py --help lists the keys")
            values[name] = coerce(value, fields[name][1], origin, name)
            origins[name] = origin

    resolved = {}
    for name, (f, _) in fields.items():  # each key's value, or its default; then its choices and range
        if name in values:
            value = values[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        origin = origins.get(name, where)
        if value is None and f.metadata.get("required"):
            raise UserError(f"{where}: missing required key '{name}'")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UserError(f"{origin}: key '{name}' must be one of {', '.join(map(str, choices))}, got {value!r}"
                            f"{closest(value, choices)}")
        valid = f.metadata.get("range")
        if valid is not None and value is not None:
            for item in value if isinstance(value, list) else [value]:
                if item not in valid:
                    raise UserError(f"{origin}: key '{name}' {valid.describe()}, got {item!r}")
        resolved[name] = value
    _check(resolved, where)
    common = GlobalConfig(**{k: v for k, v in resolved.items() if k in GlobalConfig.__dataclass_fields__})
    own = method_cls(**{k: v for k, v in resolved.items() if k in method_cls.__dataclass_fields__}) \
        if method_cls is not None else None
    return Config(common, own)


def check_folder_name(name: str, what: str) -> None:
    """`name` must be a plain folder name: not empty, no path separator, not '.' or '..', no control characters
    (so a run folder named by it stays inside the folder it is created in)."""
    problem = None
    if not name or not name.strip():
        problem = "is empty"
    elif "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        problem = "contains a path separator"
    elif name in (".", ".."):
        problem = "is not a folder name"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a control character"
    elif len(name.encode("utf-8", "surrogateescape")) > 200:
        problem = "is longer than 200 bytes"
    if problem:
        raise UserError(f"{what} {name!r} {problem}; it names the run folder and must be a plain folder name "
                        "such as 'lr0.1_run2'")


def _check(cfg: dict, where: str) -> None:
    """Cross-field checks that need no dataset (class counts are checked by the DataManager); single keys are
    checked against their declared range above."""
    if not cfg["seed"]:
        raise UserError(f"{where}: give at least one seed")
    repeated = sorted({s for s in cfg["seed"] if cfg["seed"].count(s) > 1})
    if repeated:
        raise UserError(f"{where}: seed {repeated[0]} is given twice; each seed is a separate run")
    if cfg["note"] is not None:
        check_folder_name(cfg["note"], f"{where}: note")
