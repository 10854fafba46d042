"""Where a run's processes come from: this process's device (joining the process group when torchrun started
it), or, for `--device 0,1` given to a plain `python main.py`, one process per listed GPU started through
torch.distributed.run (what torchrun runs)."""
from __future__ import annotations

import os
import signal

import torch

from trainer.device import device_ids, resolve_device
from utils import distributed
from utils.registry import Terminated, UserError


def several_gpus(spec: str) -> bool:
    """`--device 0,1` given to this process (not to a process torchrun started): launch one process per GPU."""
    return "," in str(spec) and not distributed.launched()


def start(spec: str) -> torch.device:
    """This process's device, joining the process group when torchrun started it."""
    device = resolve_device(spec)
    distributed.setup(device)
    return device


def launch(spec: str, script: str, argv: list[str]) -> None:
    """Run `script argv` as one process per listed GPU on this machine; each process trains on its GPU and rank 0
    writes the results."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    ids = device_ids(spec)
    if not torch.cuda.is_available() or max(ids) >= torch.cuda.device_count():
        raise UserError(f"device '{spec}' asks for CUDA devices {ids} but {torch.cuda.device_count()} are "
                        "available; for several CPU processes use torchrun --nproc_per_node N main.py ... --device cpu")
    launcher = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(len(ids)),
                                             os.path.abspath(script), *argv])
    try:
        torchrun(launcher)
    except SignalException as err:  # the launcher stopped its processes on a signal: end as main.cli does
        raise (Terminated() if err.sigval == signal.SIGTERM else KeyboardInterrupt()) from None
    except ChildFailedError as err:
        raise UserError(f"a process of the {len(ids)}-GPU run failed "
                        f"({next(iter(err.failures.values())).message or 'see its output above'})") from None
