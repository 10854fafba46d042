"""Fast paths of a device: the reduced precision autocast runs in, and channels-last convolution weights.

Which autocast a run gets (`amp: true`, float32 weights), decided once per run by `autocast_dtype` and logged:

| device | autocast | why |
| --- | --- | --- |
| CUDA, compute capability 8.0 or later (A100, H100, RTX 30/40) | bfloat16 | native, no overflow to guard |
| CUDA before 8.0 (V100, T4, RTX 20) | float16 with gradient scaling | no bfloat16 units; float16 needs the scaler |
| CPU with AVX512-BF16 or AMX | bfloat16 | native |
| any other CPU, MPS | none (float32) | emulated bfloat16 is about ten times slower than float32 |

Whatever autocast runs, losses, scores, key matching, attention weights, distances and optimisation inputs are
computed in at least float32 (utils/precision.py). The environment variable CL_AUTOCAST overrides the choice
for a process: `bfloat16` or `float16` forces that autocast on any device (emulated, slowly, where it is not
native: how the test suite covers the reduced-precision path on every machine), `off` turns it off, `native`
(or unset) is the table above.
"""
from __future__ import annotations

import os

import torch

from utils.registry import UserError

MODES = ("native", "bfloat16", "float16", "off")


def cpu_bf16_native() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def reduced_precision(device_type: str, cuda_capability: tuple[int, int] | None, cpu_bf16: bool,
                      mode: str = "native") -> torch.dtype | None:
    """The autocast dtype for a device (None: float32), by the table of the module docstring and the `mode` of
    CL_AUTOCAST."""
    if mode not in MODES:
        raise UserError(f"CL_AUTOCAST must be one of {', '.join(MODES)}, got '{mode}'")
    if mode != "native":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "off": None}[mode]
    if device_type == "cuda":
        return torch.bfloat16 if cuda_capability is not None and cuda_capability >= (8, 0) else torch.float16
    if device_type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `device` on this machine (see `reduced_precision`)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    cpu_bf16 = device.type == "cpu" and cpu_bf16_native()
    return reduced_precision(device.type, capability, cpu_bf16, os.environ.get("CL_AUTOCAST", "native") or "native")


def channels_last(module: torch.nn.Module) -> None:
    """Convolution weights in channels-last memory format (the layout the CPU and CUDA kernels prefer)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.to(memory_format=torch.channels_last)
