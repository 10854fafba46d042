"""Loading pretrained weights from local files only: `pretrain_path`, or a cache torchvision/timm already filled.

Nothing is downloaded. A missing file is a `UserError` that says where the weights must go, never a silent
random initialisation.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from utils.registry import UserError

_PREFIXES = ("module.", "backbone.", "feature_extractor.", "encoder.", "model.")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt`/`.safetensors` file holding a state_dict (possibly under 'state_dict' or 'model')."""
    if os.path.isdir(path):
        raise UserError(f"pretrain_path '{path}' is a folder; give the path of a local .pth or .safetensors file")
    if not os.path.isfile(path):
        raise UserError(f"pretrain_path '{path}' does not exist; give the path of a local .pth or .safetensors file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, corrupt, refused by weights_only, or not weights at all
        raise UserError(f"pretrain_path '{path}' cannot be read as .pth/.safetensors weights "
                        f"({type(err).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if isinstance(state, dict):  # entries that are not tensors (an epoch counter, say) are no weights
        state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not isinstance(state, dict) or not state:
        raise UserError(f"'{path}' holds no state_dict of tensors")
    broken = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if broken is not None:  # trained weights are finite: a NaN would surface later as a diverged run
        raise UserError(f"pretrain_path '{path}' holds NaN or infinite values in '{broken[:80]}'; these are no "
                        "trained weights: replace the file")
    cleaned = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy matching tensors into `model`; every model tensor must be covered (classifier keys are ignored)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(
            f"pretrained weights from {source} do not cover {len(missing)} of the backbone's tensors "
            f"(first: {missing[0]}); check that they belong to this backbone"
        )
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        raise UserError(f"pretrained weights from {source} have the wrong shape for '{wrong[0]}'")
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def torchvision_cache_file(name: str) -> str | None:
    """The path where torchvision caches the default weights of `name`, if that file exists."""
    from torchvision.models import get_model_weights

    try:
        url = get_model_weights(name).DEFAULT.url
    except (ValueError, AttributeError):
        return None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return path if os.path.isfile(path) else None


def load_pretrained(model: nn.Module, name: str, pretrain_path: str | None, cache_file: str | None) -> None:
    """Load `pretrain_path` if given, else the cached file; error when neither exists."""
    path = pretrain_path or cache_file
    if path is None:
        raise UserError(
            f"pretrained: true but no local weights for backbone '{name}': set pretrain_path to a .pth/.safetensors "
            f"file, or place the torchvision/timm weights in their cache ({torch.hub.get_dir()}/checkpoints); "
            "nothing is downloaded at run time"
        )
    load_into(model, read_state_dict(path), path)
