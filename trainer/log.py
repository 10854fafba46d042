"""Console + file logging (the same lines in both) for one run folder."""
from __future__ import annotations

import logging
import sys


def setup_logging(log_file: str | None, quiet: bool = False) -> logging.Logger:
    """The run's lines on stdout and in `log_file`; `quiet` (the other ranks of a distributed run): warnings on
    stderr only, no file."""
    log = logging.getLogger("cl")
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr if quiet else sys.stdout)]
    if log_file and not quiet:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


def close_logging() -> None:
    log = logging.getLogger("cl")
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)
