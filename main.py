"""Train a continual-learning method task by task: python main.py --config options/<method>/<dataset>.yaml

Any config key can be overridden as --key value (lists: --milestones 30 60); --seed 1 2 3 runs several seeds.
python main.py --list methods|datasets|backbones prints the registered names; --help lists every key.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

from utils.registry import Terminated, UserError


def main(argv: list[str] | None = None) -> str | None:
    """Run one command line: a new run, a resume or a re-test (`--checkpoint_dir`). Returns the run folder, which
    holds results.json (None for --help, --list and a run this process launched on several GPUs)."""
    from backbone import BACKBONES
    from datasets import DATASETS
    from methods import METHODS, method_config
    from trainer import cli, launch
    from trainer.config_loader import load_config
    from trainer.results import is_finished
    from trainer.resume import saved_config
    from trainer.retest import retest
    from trainer.task_loop import run
    from utils.precision import default_dtype

    argv = sys.argv[1:] if argv is None else argv
    args = cli.parse(argv)
    if args.help:
        print(cli.help_text({m: method_config(m) for m in METHODS.keys()}))
        return None
    if args.list:
        print("\n".join({"methods": METHODS, "datasets": DATASETS, "backbones": BACKBONES}[args.list].keys()))
        return None
    if args.checkpoint_dir:
        cfg = saved_config(args.checkpoint_dir, args.config, args.overrides, method_config)
    elif args.config or "method" in args.overrides:
        cfg = load_config(args.config, args.overrides, method_config)
    else:
        raise UserError("give --config options/<method>/<dataset>.yaml (python main.py --help lists the keys)")
    if launch.several_gpus(cfg.device):
        launch.launch(cfg.device, __file__, argv)
        return None
    device = launch.start(cfg.device)
    with default_dtype(cfg.precision):
        if args.checkpoint_dir and is_finished(args.checkpoint_dir, cfg):
            return retest(cfg, device, args.checkpoint_dir, strict=args.strict)
        return run(cfg, device, args.log_root, run_dir=args.checkpoint_dir)


def _one_line(err: BaseException) -> str:
    # an error re-raised from a DataLoader worker carries the worker's traceback: keep its last line
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[-1].split("UserError: ", 1)[-1]


def _terminate(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises `Terminated` while the block runs (in the main thread only: Python runs signal handlers
    there and nowhere else); the previous handler is put back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def cli(argv: list[str] | None = None) -> int:
    """main() with user errors as one line on stderr and exit status 2 (tracebacks only with --debug); Ctrl-C and
    SIGTERM (a scheduler ending the job; under torchrun every rank gets it) end the run with one line, its last
    checkpoint kept, and exit status 130 resp. 143 (128 + the signal's number)."""
    argv = sys.argv[1:] if argv is None else argv
    with _sigterm_interrupts():
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
        except Terminated:
            print("terminated (SIGTERM): the run keeps its last checkpoint; continue it with python main.py "
                  "--checkpoint_dir <its run folder>", file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(cli())
