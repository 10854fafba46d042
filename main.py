"""Train a continual-learning method task by task: python main.py --config options/<method>/<dataset>.yaml

Any config key can be overridden as --key value (lists: --milestones 30 60); --seed 1 2 3 runs several seeds.
python main.py --list methods|datasets|backbones prints the registered names; --help lists every key.
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.registry import UserError

#: main.py's own options (everything else is a config key) and how many values each takes.
OWN = {"--config": 1, "--checkpoint_dir": 1, "--list": 1, "--log_root": 1, "--debug": 0, "--help": 0, "-h": 0}
LISTS = ("methods", "datasets", "backbones")


def help_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False, prog="python main.py")
    parser.add_argument("--config", help="YAML file in the original's basic/special/options schema")
    parser.add_argument("--checkpoint_dir", help="run folder: resume it if unfinished, else re-test its saved models")
    parser.add_argument("--list", choices=LISTS, help="print registered names")
    parser.add_argument("--log_root", default="logs", help="where run folders are created (default: logs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every config key")
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split argv into main.py's own options and the config-key tokens (`--key value ...`). Each own option may
    be given once and takes exactly its values; a bare word that follows no config key is a stray argument."""
    args = argparse.Namespace(config=None, checkpoint_dir=None, list=None, log_root="logs", debug=False, help=False)
    rest: list[str] = []
    seen: set[str] = set()
    i, after_key = 0, False
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        if name in OWN:
            canonical = "--help" if name == "-h" else name
            if canonical in seen:
                raise UserError(f"{canonical} is given twice; give it once")
            seen.add(canonical)
            dest = canonical[2:]
            if OWN[name] == 0:
                if eq:
                    raise UserError(f"{canonical} takes no value, got '{token}'")
                setattr(args, dest, True)
                i, after_key = i + 1, False
                continue
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 2
            else:
                raise UserError(f"{canonical} needs a value")
            if value == "":
                raise UserError(f"{canonical} needs a value, got an empty string")
            setattr(args, dest, value)
            after_key = False
            if i < len(argv) and not argv[i].startswith("--"):
                raise UserError(f"unexpected argument '{argv[i]}' after {canonical} {value} (it takes one value); "
                                "keys are given as --key value")
            continue
        if token.startswith("--") and len(token) > 2:
            after_key = True
        elif not after_key:
            raise UserError(f"unexpected argument '{token}' on the command line; keys are given as --key value")
        rest.append(token)
        i += 1
    if args.list is not None and args.list not in LISTS:
        raise UserError(f"--list takes one of {', '.join(LISTS)}, got '{args.list}'")
    return args, rest


def main(argv: list[str] | None = None) -> dict:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    from backbone import BACKBONES
    from datasets import DATASETS
    from methods import METHODS, method_config
    from utils.config import help_text, load_config, parse_cli_overrides
    from trainer.resume import is_finished, saved_config
    from trainer.retest import retest
    from trainer.task_loop import run
    from utils.precision import default_dtype

    if args.help:
        print(help_parser().format_help() + "\n" + help_text({m: method_config(m) for m in METHODS.keys()}))
        return {}
    if args.list:
        print("\n".join({"methods": METHODS, "datasets": DATASETS, "backbones": BACKBONES}[args.list].keys()))
        return {}
    overrides = parse_cli_overrides(rest)
    if args.checkpoint_dir:
        if os.path.exists(args.checkpoint_dir) and not os.path.isdir(args.checkpoint_dir):
            raise UserError(f"--checkpoint_dir '{args.checkpoint_dir}' is a file, not a run folder; give the folder "
                            "a run printed when it started")
        cfg = saved_config(args.checkpoint_dir, args.config, overrides, method_config)
        if several_gpus(cfg.device):
            return launch(cfg.device, argv)
        device = start(cfg.device)
        with default_dtype(cfg.precision):
            if is_finished(args.checkpoint_dir, cfg):
                return retest(cfg, device, args.checkpoint_dir)
            return run(cfg, device, run_dir=args.checkpoint_dir)[0]
    if not args.config and "method" not in overrides:
        raise UserError("give --config options/<method>/<dataset>.yaml (python main.py --help lists the keys)")
    cfg = load_config(args.config, overrides, method_config)
    if several_gpus(cfg.device):
        return launch(cfg.device, argv)
    device = start(cfg.device)
    with default_dtype(cfg.precision):
        return run(cfg, device, args.log_root)[0]


def several_gpus(spec: str) -> bool:
    """`--device 0,1` given to this process (not to a process torchrun started): launch one process per GPU."""
    from utils.distributed import launched

    return "," in str(spec) and not launched()


def start(spec: str):
    """This process's device, joining the process group when torchrun started it."""
    from utils import distributed
    from utils.device import resolve_device

    device = resolve_device(spec)
    distributed.setup(device)
    return device


def launch(spec: str, argv: list[str]) -> dict:
    """Run this command as one process per listed GPU on this machine, through torch.distributed.run (what
    torchrun runs); each process trains on its GPU and rank 0 writes the results."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    from utils.device import device_ids

    ids = device_ids(spec)
    if not torch.cuda.is_available() or max(ids) >= torch.cuda.device_count():
        raise UserError(f"device '{spec}' asks for CUDA devices {ids} but {torch.cuda.device_count()} are "
                        "available; for several CPU processes use torchrun --nproc_per_node N main.py ... --device cpu")
    launcher = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(len(ids)),
                                             os.path.abspath(__file__), *argv])
    try:
        torchrun(launcher)
    except ChildFailedError as err:
        raise UserError(f"a process of the {len(ids)}-GPU run failed ({next(iter(err.failures.values())).message or 'see its output above'})") from None
    return {}


def _one_line(err: BaseException) -> str:
    # an error re-raised from a DataLoader worker carries the worker's traceback: keep its last line
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[-1].split("UserError: ", 1)[-1]


def cli(argv: list[str] | None = None) -> int:
    """main() with user errors as one line on stderr and exit status 2 (tracebacks only with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
        return 0
    except UserError as err:
        if "--debug" in argv:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk, not the code: a full disk, a read-only folder, a vanished file
        if "--debug" in argv:
            raise
        where = f" ('{err.filename}')" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or _one_line(err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
