"""Any timm model name as a backbone (`num_classes=0`: pooled features), weights from a local file or cache only."""
from __future__ import annotations

from torch import nn

from backbone.pretrained import load_into, read_state_dict
from utils.registry import UserError


def is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _timm_cache_file(name: str) -> str | None:
    import timm
    from huggingface_hub import try_to_load_from_cache

    hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(path, str):
            return path
    return None


def timm_backbone(name: str, pretrained: bool, pretrain_path: str | None) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0)
    model.feature_dim = model.num_features
    if pretrained:
        path = pretrain_path or _timm_cache_file(name)
        if path is None:
            raise UserError(
                f"pretrained: true but no local weights for timm model '{name}': set pretrain_path to a "
                ".pth/.safetensors file or fill the Hugging Face cache beforehand; nothing is downloaded at run time"
            )
        load_into(model, read_state_dict(path), path)
    return model
