"""Resolve the `--device` string once; everything else receives the torch.device. `machine` says what a run ran
on (recorded in results.json beside its numbers)."""
import os
import platform

import torch

from utils.registry import UserError


def resolve_device(spec: str) -> torch.device:
    """'auto' (CUDA if present, else MPS, else CPU), 'cpu', '0' / 'cuda:1' (one CUDA device); in a process of a
    distributed launch, 'auto' and 'cuda' mean this process's GPU (LOCAL_RANK) and '0,1' its entry of the list."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            from utils.distributed import local_rank

            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec in ("cpu", "mps"):
        if spec == "mps" and not torch.backends.mps.is_available():
            raise UserError("device 'mps' was asked for but MPS is not available; use --device cpu")
        return torch.device(spec)
    if "," in spec:  # several GPUs: one process each (main.py launches them); this process takes its own
        from utils.distributed import launched, local_rank

        ids = device_ids(spec)
        if not launched():
            raise UserError(f"device '{spec}' names {len(ids)} GPUs: run through main.py, which starts one process "
                            "per GPU, or torchrun")
        if local_rank() >= len(ids):
            raise UserError(f"device '{spec}' names {len(ids)} GPUs but this is process {local_rank()} of a launch")
        spec = str(ids[local_rank()])
    if spec == "cuda":
        from utils.distributed import local_rank

        spec = str(local_rank())
    index = spec[5:] if spec.startswith("cuda:") else spec
    if not index.isdigit():
        raise UserError(f"unknown device '{spec}'; use auto, cpu, a GPU id such as 0, or cuda:1")
    if not torch.cuda.is_available():
        raise UserError(f"device '{spec}' asks for CUDA but no CUDA device is available; use --device cpu")
    if int(index) >= torch.cuda.device_count():
        raise UserError(f"device '{spec}': there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", int(index))


def device_ids(spec: str) -> list[int]:
    """The CUDA ids of a list such as '0,1' or 'cuda:0,cuda:2'."""
    ids = []
    for part in str(spec).lower().split(","):
        part = part.strip()
        part = part[5:] if part.startswith("cuda:") else part
        if not part.isdigit():
            raise UserError(f"device list '{spec}' must name CUDA ids, such as 0,1")
        ids.append(int(part))
    if len(set(ids)) != len(ids):
        raise UserError(f"device list '{spec}' names a GPU twice")
    return ids


def machine(device: torch.device) -> dict:
    """The hardware and software that computes on `device`: its model (CPU or GPU), native bfloat16 (CPU) or
    compute capability (CUDA), this process's threads, and the torch version."""
    from trainer.engine.fastpath import cpu_bf16_native

    info = {"device": str(device), "threads": torch.get_num_threads(), "torch": str(torch.__version__)}
    if device.type == "cuda":
        return {**info, "model": torch.cuda.get_device_name(device),
                "cuda_capability": ".".join(map(str, torch.cuda.get_device_capability(device)))}
    return {**info, "model": _cpu_model(), "cores": os.cpu_count(), "native_bfloat16": cpu_bf16_native()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
