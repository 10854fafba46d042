"""Fast paths of a device: whether bfloat16 autocast pays off, and channels-last convolution weights."""
from __future__ import annotations

import torch


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays off: on CUDA, and on CPUs with native bfloat16 (AVX512-BF16 or AMX);
    elsewhere it is emulated and about ten times slower than float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def channels_last(module: torch.nn.Module) -> None:
    """Convolution weights in channels-last memory format (the layout the CPU and CUDA kernels prefer)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.to(memory_format=torch.channels_last)
