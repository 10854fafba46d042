"""Declared, typed configuration: the original's YAML schema, loaded strictly.

A config file has up to three sections (the original's schema):

    basic:   {run, dataset, method, memory keys}
    special: {the method's own hyper-parameters}
    options: {<dataset>: {<backbone>: {training hyper-parameters}}}

Precedence: command line > special > options[dataset][backbone] > basic > declared default. The options block
is chosen with the dataset/backbone *after* command-line overrides (the original chose it before them).

Every key is declared: the global keys below, and each method's own keys in a dataclass registered beside the
method. An unknown key, a wrong type or a missing required key raises `UserError` naming the file, the key and
the closest valid key. Keys of the original that we do not support raise an error that says why.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from utils.registry import UserError, closest

SECTIONS = ("basic", "special", "options")
NO_DEFAULT = object()


def key(default: Any = NO_DEFAULT, help: str = "", choices: tuple | None = None):
    """A declared config field: default, help text and (optionally) the allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if default is NO_DEFAULT:
        return field(default=None, metadata=dict(meta, required=True))
    return field(default=default, metadata=meta)


@dataclass
class GlobalConfig:
    """Keys every run understands (the original's names and meanings)."""

    # run
    method: Optional[str] = key(help="registered method name (python main.py --list methods)")
    method_type: Optional[str] = key(None, "multi_steps / single_step / pretrain; checked against the method",
                                     ("multi_steps", "single_step", "pretrain"))
    device: str = key("auto", "auto (CUDA if present, else CPU), cpu, 0, cuda:1")
    seed: list[int] = key([1993], "seeds, each a full run; results report mean and std")
    note: Optional[str] = key(None, "name of the run folder (default: a timestamp)")
    logger_type: Optional[str] = key(None, "'tensorboard' for TensorBoard scalars, or none", ("tensorboard", "none"))
    save_models: bool = key(True, "keep a checkpoint per task (false: only the latest)")
    checkpoint_every: int = key(0, "also checkpoint every N epochs inside a task (0: only after each task)")
    save_pred_record: bool = key(False, "save test predictions and targets per task as .npz in the run folder")
    num_workers: int = key(0, "DataLoader worker processes")
    amp: bool = key(True, "bfloat16 autocast on CUDA and on CPUs with native bfloat16 (AVX512-BF16, AMX); "
                          "ignored elsewhere")
    channels_last: bool = key(True, "channels-last memory format for images and convolution weights (CPU and CUDA)")
    batch_transforms: bool = key(True, "in-memory datasets: augment, resize and normalise whole batches on the "
                                       "training device (false: per-sample PIL transforms in DataLoader workers)")
    # data
    dataset: Optional[str] = key(help="registered dataset name (python main.py --list datasets)")
    data_root: Optional[str] = key(None, "folder holding the datasets (default: $DATA, else ./data)")
    img_size: Optional[int] = key(None, "final image size (default: the dataset's own)")
    shuffle: bool = key(False, "shuffle the class order (or the sub-dataset order)")
    class_order_seed: Optional[int] = key(None, "seed of the shuffled class order (default: the run's seed)")
    split_dataset: bool = key(True, "split classes into tasks; false: one task with every class")
    init_cls: Optional[int] = key(None, "classes in the first task (default: increment)")
    train_list: Optional[str] = key(None, "skin8: list file of '<relative path> <label>' training lines (default: "
                                    "ISIC2019/skin8_train_500.txt if present, else a split of the ground-truth CSV)")
    test_list: Optional[str] = key(None, "skin8: the same for the test split")
    increment: Optional[int] = key(None, "classes in each later task; the last task takes the remainder")
    # method / evaluation
    incre_type: str = key("cil", "cil: predict among all seen classes; til: within the sample's task", ("cil", "til"))
    eval_metric: str = key("acc", "acc: accuracy; mcr: mean class recall", ("acc", "mcr"))
    apply_nme: bool = key(False, "also report the nearest-mean-of-exemplars classifier (needs memory)")
    openset_test: bool = key(False, "also score unseen classes of later tasks as unknown (AUROC, FPR95, AP)")
    test_epoch: int = key(0, "evaluate on the seen-class test set every N epochs (0: only after each task)")
    # backbone
    backbone: Optional[str] = key(help="registered backbone or any timm model name")
    pretrained: bool = key(False, "load pretrained weights (from pretrain_path or a local cache only)")
    pretrain_path: Optional[str] = key(None, "local .pth/.safetensors file with backbone weights")
    freeze_fe: bool = key(False, "freeze the feature extractor; train only the classifier")
    # optimisation (init_* apply to the first task and default to the plain keys)
    epochs: int = key(1, "epochs per task")
    init_epochs: Optional[int] = key(None, "epochs of the first task")
    batch_size: int = key(32, "training batch size")
    replay_batch_size: Optional[int] = key(None, "batch size of replayed memory (default batch_size)")
    opt_type: str = key("sgd", "optimizer", ("sgd", "adam", "adamw"))
    lrate: float = key(0.1, "learning rate")
    init_lrate: Optional[float] = key(None, "learning rate of the first task")
    opt_mom: float = key(0.9, "SGD momentum")
    init_opt_mom: Optional[float] = key(None, "SGD momentum of the first task")
    nesterov: bool = key(False, "Nesterov momentum")
    init_nesterov: Optional[bool] = key(None, "Nesterov momentum in the first task")
    weight_decay: float = key(0.0, "weight decay")
    init_weight_decay: Optional[float] = key(None, "weight decay of the first task")
    scheduler: Optional[str] = key(None, "learning-rate schedule, stepped per epoch", ("multi_step", "cos", "none"))
    init_scheduler: Optional[str] = key(None, "schedule of the first task", ("multi_step", "cos", "none"))
    milestones: list[int] = key([], "multi_step epochs at which the rate is multiplied by lrate_decay")
    init_milestones: Optional[list[int]] = key(None, "milestones of the first task")
    lrate_decay: float = key(0.1, "multi_step decay factor")
    init_lrate_decay: Optional[float] = key(None, "decay factor of the first task")
    # memory
    memory_size: int = key(0, "total replay memory in samples; 0 means no memory")
    fixed_memory: bool = key(False, "fixed per-class memory (memory_per_class) instead of a fixed total")
    memory_per_class: Optional[int] = key(None, "per-class memory when fixed_memory (default memory_size // classes)")
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
        if not f.metadata.get("help"):
            base = next((b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)
                         and f.name in {g.name for g in dataclasses.fields(b)}), None)
            if base is not None:
                f = copy.copy(f)
                f.metadata = next(g for g in dataclasses.fields(base) if g.name == f.name).metadata
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


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{line}") from None
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
    return {s: data.get(s) or {} for s in SECTIONS}


def parse_cli_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key v` or `--key v1 v2 ...` pairs; each value is read as YAML (false, 1e-3, [30, 60])."""
    overrides: dict[str, Any] = {}
    name = None
    for token in tokens:
        if token.startswith("--") and len(token) > 2 and not _is_number(token):
            name, _, inline = token[2:].partition("=")
            overrides[name] = []
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

    resolved = {}
    for name, (f, _) in fields.items():
        if name in values:
            value = values[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        if value is None and f.metadata.get("required"):
            raise UserError(f"{where}: missing required key '{name}'")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UserError(f"{where}: key '{name}' must be one of {', '.join(map(str, choices))}, got {value!r}"
                            f"{closest(value, choices)}")
        resolved[name] = value
    _check(resolved, where)
    return Config(**resolved)


def _check(cfg: dict, where: str) -> None:
    """Cross-field checks that need no dataset (class counts are checked by the DataManager)."""
    for name in ("init_cls", "increment"):
        if cfg[name] is not None and cfg[name] <= 0:
            raise UserError(f"{where}: {name} must be positive, got {cfg[name]}")
    for name in ("memory_size", "num_workers", "test_epoch", "epochs", "init_epochs", "checkpoint_every"):
        if cfg[name] is not None and cfg[name] < 0:
            raise UserError(f"{where}: {name} must not be negative, got {cfg[name]}")
    if cfg["memory_per_class"] is not None and cfg["memory_per_class"] < 0:
        raise UserError(f"{where}: memory_per_class must not be negative")
    if cfg["batch_size"] <= 0:
        raise UserError(f"{where}: batch_size must be positive")
    if not cfg["seed"]:
        raise UserError(f"{where}: give at least one seed")


def help_text(method_configs: dict[str, Any]) -> str:
    """Every key with its type, default and meaning: the global keys, then each method's own."""

    def table(cls):
        rows = []
        for f, tp in declared_fields(cls).values():
            default = "required" if f.metadata.get("required") else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory())
            choices = f.metadata.get("choices")
            extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
            rows.append(f"  --{f.name:<20} {_type_name(tp):<14} default {default!s:<12} {f.metadata.get('help', '')}{extra}")
        return rows

    lines = ["global keys (any of them in the YAML or as --key value):"] + table(GlobalConfig)
    for name, cls in sorted(method_configs.items()):
        if cls is not None:
            lines += ["", f"keys of method '{name}':"] + table(cls)
    return "\n".join(lines)
