"""The configuration schema: every global key a run understands (`GlobalConfig`), how a key is declared (`key`,
with its help, its choices or its valid numeric range), and the resolved, read-only `Config` every layer reads.

Each method declares its own keys the same way, in a frozen dataclass registered beside it (`register_method(...,
config=...)`); a method key may not shadow a global key. A config file has up to three sections (the original's
schema):

    basic:   {run, dataset, method, memory keys}
    special: {the method's own hyper-parameters}
    options: {<dataset>: {<backbone>: {training hyper-parameters}}}

Reading files and the command line into a `Config` (precedence, types, ranges, one-line errors) is
trainer/config_loader.py; `python main.py --help` prints every key.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

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
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float (0xfff...) lies outside every range we declare
            return False
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


@dataclass(frozen=True)
class GlobalConfig:
    """Keys every run understands (the original's names and meanings)."""

    # run
    method: Optional[str] = key(help="registered method name (python main.py --list methods)")
    method_type: Optional[str] = key(None, "multi_steps / single_step / pretrain; checked against the method",
                                     ("multi_steps", "single_step", "pretrain"))
    device: str = key("auto", "auto (CUDA if present, else CPU), cpu, 0, cuda:1")
    seed: list[int] = key([1993], "seeds, each a full run; results report mean and std", range=SEED_RANGE)
    note: Optional[str] = key(None, "name of the run folder (a plain folder name; default: a timestamp)")
    logger_type: Optional[str] = key(None, "'tensorboard' for TensorBoard scalars, 'wandb' for a Weights & Biases "
                                           "run per seed (pip install wandb), or none",
                                     ("tensorboard", "wandb", "none"))
    wandb_project: str = key("cl-pytorch", "logger_type wandb: the W&B project of the runs")
    wandb_mode: str = key("offline", "logger_type wandb: offline (the default: the W&B runs are only written under "
                                     "the run folder's wandb/, so a run never needs the network or a W&B login; "
                                     "upload them later with wandb sync) or online (streamed to the W&B server); "
                                     "WANDB_MODE=offline or disabled in the environment wins", ("offline", "online"))
    save_models: bool = key(True, "keep a checkpoint per task (false: only the latest)")
    checkpoint_every: int = key(0, "also checkpoint every N epochs inside a task (0: only after each task)",
                                range=NON_NEGATIVE)
    save_pred_record: bool = key(False, "save test predictions and targets per task as .npz in the run folder")
    num_workers: int = key(0, "DataLoader worker processes", range=NON_NEGATIVE)
    amp: bool = key(True, "autocast where it pays off: bfloat16 on GPUs of compute capability 8.0+ and CPUs with "
                          "native bfloat16 (AVX512-BF16, AMX), float16 with gradient scaling on older GPUs; "
                          "float32 elsewhere")
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
    # at 1 and 2 px a resnet32 sees nearly constant channels and its batch norm makes training diverge (measured
    # on digits); 3 px trained, so 4 leaves a margin. Larger minimums of a backbone are its own errors.
    img_size: Optional[int] = key(None, "final image size in px (default: the dataset's own)", range="[4, inf)")
    normalize: str = key("dataset", "input normalisation: dataset (the dataset's own mean/std), imagenet "
                                    "(mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225): torchvision's and most "
                                    "timm weights) or inception ((x * 255 - 127) / 128: the TensorFlow convention "
                                    "of the packaged efficientnet_lite0 weights); a pretrained backbone wants what "
                                    "its weights were trained with", ("dataset", "imagenet", "inception"))
    shuffle: bool = key(False, "shuffle the class order (or the sub-dataset order)")
    class_order_seed: Optional[int] = key(None, "seed of the shuffled class order (default: the run's seed)",
                                          range=SEED_RANGE)
    split_dataset: bool = key(True, "split classes into tasks; false: one task with every class")
    val_split: float = key(0.0, "hold out this share of each class's training samples (stratified, seeded by the "
                                "run's seed; at least 1 of a class of 2 or more) as a validation set: each task "
                                "then also records val_acc on the seen classes' held-out samples; memory and class "
                                "means see only the rest (0: no validation set)", range="[0, 1)")
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


class Config:
    """The resolved configuration of a run, read-only: the global keys (a `GlobalConfig`) and the method's own
    keys (an instance of the dataclass it registered, or None), read as one flat namespace: `cfg.lrate`, `cfg.T`.
    A method key never shadows a global one (refused when the method registers)."""

    __slots__ = ("common", "own")

    def __init__(self, common: GlobalConfig, own=None):
        object.__setattr__(self, "common", common)
        object.__setattr__(self, "own", own)

    def __getattr__(self, name: str):
        if not name.startswith("__"):
            for part in (object.__getattribute__(self, "own"), object.__getattribute__(self, "common")):
                if part is not None and name in part.__dataclass_fields__:
                    return getattr(part, name)
        raise AttributeError(f"no config key '{name}'")

    def __setattr__(self, name, value):
        raise AttributeError("the config is read-only; compute derived values locally")

    def __getstate__(self):
        return self.common, self.own

    def __setstate__(self, state):
        object.__setattr__(self, "common", state[0])
        object.__setattr__(self, "own", state[1])

    def to_dict(self) -> dict:
        """Every key and its value: the global keys, then the method's."""
        parts = [p for p in (self.common, self.own) if p is not None]
        return {f.name: getattr(p, f.name) for p in parts for f in dataclasses.fields(p)}

    def defaults(self) -> dict:
        """Every key and its default value."""
        parts = [p for p in (self.common, self.own) if p is not None]
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for p in parts for f in dataclasses.fields(p)}

    def replace(self, **changes) -> "Config":
        """A copy with some keys changed (their types are not checked again)."""
        unknown = [k for k in changes if k not in self.to_dict()]
        if unknown:
            raise AttributeError(f"no config key '{unknown[0]}'")

        def part(p):
            return None if p is None else dataclasses.replace(
                p, **{k: v for k, v in changes.items() if k in p.__dataclass_fields__})

        return Config(part(self.common), part(self.own))


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


