"""Declared, typed configuration: the original's YAML schema, loaded strictly.

A config file has up to three sections (the original's schema):

    basic:   {run, dataset, method, memory keys}
    special: {the method's own hyper-parameters}
    options: {<dataset>: {<backbone>: {training hyper-parameters}}}

Precedence: command line > special > options[dataset][backbone] > basic > declared default. The options block
is chosen with the dataset/backbone *after* command-line overrides (the original chose it before them).

Every key is declared: the global keys below, and each method's own keys in a dataclass registered beside the
method. An unknown key, a wrong type or a missing required key raises `UserError` naming the file, the key and
the closest valid key. A numeric key may declare its valid range (`key(0.1, "...", range="(0, inf)")`, shown by
--help); a value outside it is an error naming where it came from. Keys of the original that we do not support
raise an error that says why.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from utils.registry import UserError, closest

SECTIONS = ("basic", "special", "options")
NO_DEFAULT = object()


@dataclass(frozen=True)
class Range:
    """A numeric interval such as [0, inf) or (0, 1]: `low`/`high` with open or closed ends."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        match = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])\s*", text)
        if not match:
            raise ValueError(f"a range is written like '[0, inf)' or '(0, 1]', not {text!r}")
        lo, hi = float(match.group(2)), float(match.group(3))
        if not lo <= hi:
            raise ValueError(f"empty range {text!r}")
        return cls(lo, hi, match.group(1) == "(", match.group(4) == ")")

    def __contains__(self, value) -> bool:
        value = float(value)
        if math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The rule in words, with the interval: 'must not be negative (range [0, inf))'."""
        if math.isinf(self.high) and self.low == 0:
            return f"must be positive (range {self})" if self.low_open else f"must not be negative (range {self})"
        if math.isinf(self.high) and not self.low_open:
            return f"must be at least {self.low:g} (range {self})"
        return f"must lie in {self}"

    def __str__(self) -> str:
        def num(v):
            return ("-inf" if v < 0 else "inf") if math.isinf(v) else (str(int(v)) if float(v).is_integer() else str(v))

        return f"{'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"


def key(default: Any = NO_DEFAULT, help: str = "", choices: tuple | None = None, range: str | None = None):
    """A declared config field: default, help text and (optionally) the allowed values or the valid numeric
    range, written as an interval ('[0, inf)', '(0, 1]'); a list key's range applies to each item."""
    meta = {"help": help, "choices": choices, "range": Range.parse(range) if range else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if default is NO_DEFAULT:
        return field(default=None, metadata=dict(meta, required=True))
    return field(default=default, metadata=meta)


#: The seeds numpy accepts.
SEED_RANGE = "[0, 4294967295]"
POSITIVE, NON_NEGATIVE = "[1, inf)", "[0, inf)"


@dataclass
class GlobalConfig:
    """Keys every run understands (the original's names and meanings)."""

    # run
    method: Optional[str] = key(help="registered method name (python main.py --list methods)")
    method_type: Optional[str] = key(None, "multi_steps / single_step / pretrain; checked against the method",
                                     ("multi_steps", "single_step", "pretrain"))
    device: str = key("auto", "auto (CUDA if present, else CPU), cpu, 0, cuda:1")
    seed: list[int] = key([1993], "seeds, each a full run; results report mean and std", range=SEED_RANGE)
    note: Optional[str] = key(None, "name of the run folder (a plain folder name; default: a timestamp)")
    logger_type: Optional[str] = key(None, "'tensorboard' for TensorBoard scalars, or none", ("tensorboard", "none"))
    save_models: bool = key(True, "keep a checkpoint per task (false: only the latest)")
    checkpoint_every: int = key(0, "also checkpoint every N epochs inside a task (0: only after each task)",
                                range=NON_NEGATIVE)
    save_pred_record: bool = key(False, "save test predictions and targets per task as .npz in the run folder")
    num_workers: int = key(0, "DataLoader worker processes", range=NON_NEGATIVE)
    amp: bool = key(True, "bfloat16 autocast on CUDA and on CPUs with native bfloat16 (AVX512-BF16, AMX); "
                          "ignored elsewhere")
    precision: str = key("float32", "float32, or float64 (every weight, input and loss; slower, no autocast): for "
                                    "checking that two runs compute the same thing, e.g. distributed against one "
                                    "process, where float32 rounding grows into different weights",
                         ("float32", "float64"))
    channels_last: bool = key(True, "channels-last memory format for images and convolution weights (CPU and CUDA)")
    sync_bn: bool = key(False, "distributed runs: batch norm over the global batch (every rank's samples) instead "
                               "of each process's share")
    batch_transforms: bool = key(True, "in-memory datasets: augment, resize and normalise whole batches on the "
                                       "training device (false: per-sample PIL transforms in DataLoader workers)")
    # data
    dataset: Optional[str] = key(help="registered dataset name (python main.py --list datasets)")
    data_root: Optional[str] = key(None, "folder holding the datasets (default: $DATA, else ./data)")
    img_size: Optional[int] = key(None, "final image size (default: the dataset's own)", range=POSITIVE)
    shuffle: bool = key(False, "shuffle the class order (or the sub-dataset order)")
    class_order_seed: Optional[int] = key(None, "seed of the shuffled class order (default: the run's seed)",
                                          range=SEED_RANGE)
    split_dataset: bool = key(True, "split classes into tasks; false: one task with every class")
    init_cls: Optional[int] = key(None, "classes in the first task (default: increment)", range=POSITIVE)
    train_list: Optional[str] = key(None, "skin8: list file of '<relative path> <label>' training lines (default: "
                                    "ISIC2019/skin8_train_500.txt if present, else a split of the ground-truth CSV)")
    test_list: Optional[str] = key(None, "skin8: the same for the test split")
    increment: Optional[int] = key(None, "classes in each later task; the last task takes the remainder",
                                   range=POSITIVE)
    # method / evaluation
    incre_type: str = key("cil", "cil: predict among all seen classes; til: within the sample's task", ("cil", "til"))
    eval_metric: str = key("acc", "acc: accuracy; mcr: mean class recall", ("acc", "mcr"))
    apply_nme: bool = key(False, "also report the nearest-mean-of-exemplars classifier (needs memory)")
    openset_test: bool = key(False, "also score unseen classes of later tasks as unknown (AUROC, FPR95, AP)")
    test_epoch: int = key(0, "evaluate on the seen-class test set every N epochs (0: only after each task)",
                          range=NON_NEGATIVE)
    # backbone
    backbone: Optional[str] = key(help="registered backbone or any timm model name")
    pretrained: bool = key(False, "load pretrained weights (from pretrain_path or a local cache only)")
    pretrain_path: Optional[str] = key(None, "local .pth/.safetensors file with backbone weights")
    freeze_fe: bool = key(False, "freeze the feature extractor; train only the classifier")
    # optimisation (init_* apply to the first task and default to the plain keys)
    epochs: int = key(1, "epochs per task", range=POSITIVE)
    init_epochs: Optional[int] = key(None, "epochs of the first task", range=POSITIVE)
    batch_size: int = key(32, "training batch size", range=POSITIVE)
    replay_batch_size: Optional[int] = key(None, "batch size of replayed memory (default batch_size)",
                                           range=POSITIVE)
    opt_type: str = key("sgd", "optimizer", ("sgd", "adam", "adamw"))
    lrate: float = key(0.1, "learning rate", range="(0, inf)")
    init_lrate: Optional[float] = key(None, "learning rate of the first task", range="(0, inf)")
    opt_mom: float = key(0.9, "SGD momentum", range="[0, 1)")
    init_opt_mom: Optional[float] = key(None, "SGD momentum of the first task", range="[0, 1)")
    nesterov: bool = key(False, "Nesterov momentum")
    init_nesterov: Optional[bool] = key(None, "Nesterov momentum in the first task")
    weight_decay: float = key(0.0, "weight decay", range="[0, inf)")
    init_weight_decay: Optional[float] = key(None, "weight decay of the first task", range="[0, inf)")
    scheduler: Optional[str] = key(None, "learning-rate schedule, stepped per epoch", ("multi_step", "cos", "none"))
    init_scheduler: Optional[str] = key(None, "schedule of the first task", ("multi_step", "cos", "none"))
    milestones: list[int] = key([], "multi_step epochs at which the rate is multiplied by lrate_decay", range=POSITIVE)
    init_milestones: Optional[list[int]] = key(None, "milestones of the first task", range=POSITIVE)
    lrate_decay: float = key(0.1, "multi_step decay factor", range="(0, 1]")
    init_lrate_decay: Optional[float] = key(None, "decay factor of the first task", range="(0, 1]")
    # memory
    memory_size: int = key(0, "total replay memory in samples; 0 means no memory", range=NON_NEGATIVE)
    fixed_memory: bool = key(False, "fixed per-class memory (memory_per_class) instead of a fixed total")
    memory_per_class: Optional[int] = key(None, "per-class memory when fixed_memory (default memory_size // classes)",
                                          range=POSITIVE)
    sampling_method: str = key("herding", "exemplar selection",
                               ("herding", "random", "closest_to_mean", "reservoir"))


#: Keys of the original code that we do not support, with the reason given to the user.
DROPPED = {
    "use_valid": "the original crashes with it (no dataset ships a validation split); it is not supported",
    "split_for_valid": "the original declares it but never uses it; remove it",
    "criterion": "the original's center_loss was applied to logits (a bug); training uses each method's own loss",
    "MLP_projector": "the MLP projector head is not supported; remove the key",
    "gpu_num": "derived from --device in the original; remove it",
}


#: Keys that may change when a run is resumed or re-tested (they do not change what is computed).
RUNTIME_KEYS = ("device", "num_workers")


class Config(types.SimpleNamespace):
    """The resolved configuration: read-only attribute access to every key (global and method)."""

    def __setattr__(self, name, value):
        raise AttributeError("the config is read-only; compute derived values locally")

    def to_dict(self) -> dict:
        return dict(vars(self))

    def replace(self, **changes) -> "Config":
        return Config(**{**vars(self), **changes})


def declared_fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (field, resolved type annotation) of a config dataclass. A field a subclass redeclares with only a
    new default (no help of its own) keeps the metadata of the base class's field."""
    if cls is None:
        return {}
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):  # the nearest base class that declares the key with its help
            declared = (g for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)
                        for g in dataclasses.fields(b) if g.name == f.name and g.metadata.get("help"))
            base = next(declared, None)
            if base is not None:
                f = copy.copy(f)
                f.metadata = base.metadata
        fields[f.name] = (f, hints[f.name])
    return fields


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
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
        raise UserError(f"{where}: key '{name}' takes one value ({_type_name(tp)}), got a list {list(value)!r}")
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
    raise UserError(f"{where}: key '{name}' must be {_type_name(tp)}, got {value!r}")


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


def parse_cli_overrides(tokens: list[str]) -> dict[str, Any]:
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
            raise UserError(f"unexpected argument '{token}' on the command line; keys are given as --key value")
        else:
            overrides[name].append(token)
    parsed = {}
    for name, values in overrides.items():
        if not values:
            raise UserError(f"command line: --{name} needs a value")
        items = [_yaml_scalar(v) for v in values]
        parsed[name] = items[0] if len(items) == 1 else items
    return parsed


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _yaml_scalar(text: str) -> Any:
    if not text.strip() or any(ord(c) < 32 for c in text):
        return text  # kept as typed: YAML would read an empty value as null and fold a newline into a space
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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
    for name, (f, _) in fields.items():
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
    return Config(**resolved)


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


def help_text(method_configs: dict[str, Any]) -> str:
    """Every key with its type, default and meaning: the global keys, then each method's own."""

    def table(cls):
        rows = []
        for f, tp in declared_fields(cls).values():
            default = "required" if f.metadata.get("required") else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory())
            choices, valid = f.metadata.get("choices"), f.metadata.get("range")
            extra = f" [{'|'.join(map(str, choices))}]" if choices else (f" (range {valid})" if valid else "")
            rows.append(f"  --{f.name:<20} {_type_name(tp):<14} default {default!s:<12} {f.metadata.get('help', '')}{extra}")
        return rows

    lines = ["global keys (any of them in the YAML or as --key value):"] + table(GlobalConfig)
    for name, cls in sorted(method_configs.items()):
        if cls is not None:
            lines += ["", f"keys of method '{name}':"] + table(cls)
    return "\n".join(lines)
