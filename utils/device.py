"""Resolve the `--device` string once; everything else receives the torch.device."""
import torch

from utils.registry import UserError


def resolve_device(spec: str) -> torch.device:
    """'auto' (CUDA if present, else MPS, else CPU), 'cpu', '0' / 'cuda:1' (one CUDA device)."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec in ("cpu", "mps"):
        if spec == "mps" and not torch.backends.mps.is_available():
            raise UserError("device 'mps' was asked for but MPS is not available; use --device cpu")
        return torch.device(spec)
    if "," in spec:
        raise UserError(f"device '{spec}' names several GPUs; multi-GPU training is not supported yet, "
                        "give one id such as --device 0")
    index = spec[5:] if spec.startswith("cuda:") else ("0" if spec == "cuda" else spec)
    if not index.isdigit():
        raise UserError(f"unknown device '{spec}'; use auto, cpu, a GPU id such as 0, or cuda:1")
    if not torch.cuda.is_available():
        raise UserError(f"device '{spec}' asks for CUDA but no CUDA device is available; use --device cpu")
    if int(index) >= torch.cuda.device_count():
        raise UserError(f"device '{spec}': there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", int(index))
