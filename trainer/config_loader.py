"""Reading a run's configuration: a YAML file of the original's schema (utils/config.py) and command-line
overrides, resolved strictly into a `Config`.

Precedence: command line > special > options[dataset][backbone] > basic > declared default. The options block
is chosen with the dataset/backbone *after* command-line overrides (the original chose it before them).

An unknown key, a wrong type or a missing required key raises `UserError` naming the file, the key and the
closest valid key; a value outside its declared range or choices is an error naming where it came from; keys of
the original that we do not support raise an error that says why. The method's keys become an instance of its
config dataclass (whose own checks, if any, run then). A value quoted in an error is shortened (`shorten`).

YAML is read within bounds (`load_yaml`), for config files, a run folder's config.yaml and command-line values
alike: a file of at most `MAX_FILE_BYTES`, values of at most `MAX_VALUE_CHARS` characters, at most `MAX_DEPTH`
levels of nesting, and at most `MAX_VALUES` values once aliases are expanded. Aliases are kept (options files
share their stage settings with `<<: *stages`), but each one counts the values it stands for, so nine levels of
ten aliases (a billion values in a few hundred bytes) are refused before anything formats or walks them.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from utils.config import DROPPED, Config, GlobalConfig, declared_fields
from utils.registry import UserError, closest, shorten

SECTIONS = ("basic", "special", "options")
#: A config is a few KB (options files, a run's config.yaml); PyYAML reads ~30 KB a second at worst.
MAX_FILE_BYTES = 32 * 1024
#: The longest value a key takes (a path: PATH_MAX).
MAX_VALUE_CHARS = 4096
#: Nesting of sections, blocks and lists (a config nests 4 levels).
MAX_DEPTH = 32
#: Values (keys, scalars, lists, mappings) once every alias is expanded (a config holds a few hundred).
MAX_VALUES = 10_000


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
            given, stray = " ".join(map(str, value)), " ".join(map(str, value[1:]))
            raise UserError(f"command line: --{name} takes one value, got {len(value)}: "
                            f"{given if len(given) <= 80 else shorten(given)} (is {shorten(stray)} a stray argument?)")
        raise UserError(f"{where}: key '{name}' takes one value ({type_name(tp)}), got a list {shorten(list(value))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return value == 1
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string
            except (ValueError, OverflowError):  # not a number; an integer beyond any float
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and \
                not (isinstance(value, int) and value.bit_length() > 4096):  # too long to print in decimal
            return str(value)
    raise UserError(f"{where}: key '{name}' must be {type_name(tp)}, got {shorten(value)}")


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML lets the last one silently win) and
    nesting deeper than `MAX_DEPTH` (PyYAML composes recursively, and scans deep flow nesting in quadratic time)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the mapping's own keys; merged ones (<<: *anchor) may be overridden
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = self.construct_object(key_node, deep=deep)
            duplicate = name in seen
            seen.add(name)
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {shorten(name)}",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _beyond_bounds(root) -> tuple[str, yaml.Node] | None:
    """Why the composed document `root` is beyond the bounds, with the node that crosses them (None when it is
    not): a value longer than MAX_VALUE_CHARS, an alias inside the value it names, or more than MAX_VALUES values
    once aliases are expanded. Each node is measured once (aliases share their node), without recursion."""
    size: dict[int, int] = {}  # id(node) -> values it expands to; the nodes stay alive in `root`
    path = [(root, iter(_children(root)))]
    on_path = {id(root)}
    while path:
        node, children = path[-1]
        child = next(children, None)
        if child is None:  # every child measured
            path.pop()
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in _children(node))
            if size[id(node)] > MAX_VALUES:
                return f"aliases expand it to more than {MAX_VALUES:,} values", node
        elif id(child) in on_path:
            return "an alias inside the value it names", child
        elif id(child) not in size:
            if isinstance(child, yaml.ScalarNode):
                if len(child.value) > MAX_VALUE_CHARS:
                    return f"a value of {len(child.value):,} characters (at most {MAX_VALUE_CHARS:,})", child
                size[id(child)] = 1
            else:
                path.append((child, iter(_children(child))))
                on_path.add(id(child))
    if isinstance(root, yaml.ScalarNode) and len(root.value) > MAX_VALUE_CHARS:
        return f"a value of {len(root.value):,} characters (at most {MAX_VALUE_CHARS:,})", root
    return None


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def load_yaml(text: str, where: str):
    """The YAML document in `text`, read within the bounds above. Malformed YAML raises `yaml.YAMLError` (the
    caller words it); a document beyond the bounds is a `UserError` naming `where` and the line."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        beyond = _beyond_bounds(node) if node is not None else None
        if beyond:
            raise UserError(f"{where}: line {beyond[1].start_mark.line + 1}: {beyond[0]}; a config holds plain "
                            "values and short lists")
        return loader.construct_document(node) if node is not None else None
    except RecursionError:  # block nesting below MAX_DEPTH levels cannot get here; kept as a last line of defence
        raise UserError(f"{where}: line {loader.get_mark().line + 1}: nesting too deep; a config holds plain "
                        "values and short lists") from None
    except ValueError as err:  # a date that is no date (2024-13-01)
        raise UserError(f"{where}: a value cannot be read ({str(err)[:200]})") from None
    finally:
        loader.dispose()


def read_bounded(path: str, what: str, usual: str) -> bytes:
    """The bytes of the small text file `path` (a config or sweep file), at most MAX_FILE_BYTES: a larger file is a
    one-line error saying what such a file usually is (`usual`), so a wrong file is never read whole."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise UserError(f"{what} '{path}' cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise UserError(f"{what} '{path}' is larger than {MAX_FILE_BYTES // 1024} KiB; {usual}")
    return raw


def _read_yaml(path: str) -> dict:
    if os.path.isdir(path):
        raise UserError(f"config file '{path}' is a folder; give a .yaml file such as "
                        "options/finetune_il/digits.yaml")
    if not os.path.exists(path):
        raise UserError(f"config file '{path}' does not exist")
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' is not a regular file; give a .yaml file")
    raw = read_bounded(path, "config file", "a config is a few KB (is it the right file?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file (byte 0x{raw[err.start]:02x} at offset {err.start}); save "
                        "the config as UTF-8") from None
    try:
        data = load_yaml(text, path)
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
            raise UserError(f"{path}: unknown section {shorten(section)}{closest(section, SECTIONS)}; "
                            f"sections are {', '.join(SECTIONS)}")
        if data[section] is not None and not isinstance(data[section], dict):
            raise UserError(f"{path}: section '{section}' must be a mapping")
    for section in ("basic", "special"):
        for name in data.get(section) or {}:
            if not isinstance(name, str):
                raise UserError(f"{path}: key {shorten(name)} under {section}: is not a name")
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
        by_dataset = options.get(dataset) if not isinstance(dataset, (list, dict)) else None
        if not isinstance(by_dataset, dict) or isinstance(backbone, (list, dict)) \
                or not isinstance(by_dataset.get(backbone), dict):
            available = [f"{d}/{b}" for d, v in options.items() if isinstance(v, dict) for b in v]
            raise UserError(f"{where}: options has no block for dataset {shorten(dataset)} and backbone "
                            f"{shorten(backbone)}; blocks: {', '.join(available[:10]) or 'none'}"
                            + (f" and {len(available) - 10} more" if len(available) > 10 else ""))
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
                raise UserError(f"{origin}: unknown key {shorten(name)}{closest(name, fields)} for method "
                                f"{shorten(method)}; "
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
            raise UserError(f"{origin}: key '{name}' must be one of {', '.join(map(str, choices))}, got "
                            f"{shorten(value)}"
                            f"{closest(value, choices)}")
        valid = f.metadata.get("range")
        if valid is not None and value is not None:
            for item in value if isinstance(value, list) else [value]:
                if item not in valid:
                    raise UserError(f"{origin}: key '{name}' {valid.describe()}, got {shorten(item)}")
        resolved[name] = value
    _check(resolved, {name: origins.get(name, where) for name in ("seed", "note")})
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
        raise UserError(f"{what} {shorten(name)} {problem}; it names the run folder and must be a plain folder name "
                        "such as 'lr0.1_run2'")


def _check(cfg: dict, origin: dict[str, str]) -> None:
    """Checks of values beyond their declared range, each naming where its key was given (`origin`: the config
    file or the command line). Class counts are checked by the DataManager."""
    if not cfg["seed"]:
        raise UserError(f"{origin['seed']}: give at least one seed")
    repeated = sorted({s for s in cfg["seed"] if cfg["seed"].count(s) > 1})
    if repeated:
        raise UserError(f"{origin['seed']}: seed {repeated[0]} is given twice; each seed is a separate run")
    if cfg["note"] is not None:
        check_folder_name(cfg["note"], f"{origin['note']}: note")
