"""Train a continual-learning method task by task: python main.py --config options/<method>/<dataset>.yaml

Any config key can be overridden as --key value (lists: --milestones 30 60); --seed 1 2 3 runs several seeds.
python main.py --list methods|datasets|backbones prints the registered names; --help lists every key.
"""
from __future__ import annotations

import argparse
import sys

from utils.registry import UserError


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--config", help="YAML file in the original's basic/special/options schema")
    parser.add_argument("--checkpoint_dir", help="run folder: resume it if unfinished, else re-test its saved models")
    parser.add_argument("--list", choices=("methods", "datasets", "backbones"), help="print registered names")
    parser.add_argument("--log_root", default="logs", help="where run folders are created (default: logs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every config key")
    return parser.parse_known_args(argv), parser


def main(argv: list[str] | None = None) -> dict:
    (args, rest), parser = parse(sys.argv[1:] if argv is None else argv)
    from backbone import BACKBONES
    from datasets import DATASETS
    from methods import METHODS, method_config
    from utils.config import help_text, load_config, parse_cli_overrides
    from trainer.resume import is_finished, saved_config
    from trainer.retest import retest
    from trainer.task_loop import run
    from utils.device import resolve_device

    if args.help:
        print(parser.format_help() + "\n" + help_text({m: method_config(m) for m in METHODS.keys()}))
        return {}
    if args.list:
        print("\n".join({"methods": METHODS, "datasets": DATASETS, "backbones": BACKBONES}[args.list].keys()))
        return {}
    if args.checkpoint_dir:
        cfg = saved_config(args.checkpoint_dir, args.config, parse_cli_overrides(rest), method_config)
        device = resolve_device(cfg.device)
        if is_finished(args.checkpoint_dir, cfg):
            return retest(cfg, device, args.checkpoint_dir)
        return run(cfg, device, run_dir=args.checkpoint_dir)[0]
    if not args.config and "--method" not in rest:
        raise UserError("give --config options/<method>/<dataset>.yaml (python main.py --help lists the keys)")
    cfg = load_config(args.config, parse_cli_overrides(rest), method_config)
    results, _ = run(cfg, resolve_device(cfg.device), args.log_root)
    return results


def cli(argv: list[str] | None = None) -> int:
    """main() with user errors as one line on stderr and exit status 2 (tracebacks only with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
        return 0
    except UserError as err:
        if "--debug" in argv:
            raise
        # an error re-raised from a DataLoader worker carries the worker's traceback: keep its last line
        line = str(err).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
