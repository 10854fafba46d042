"""Console + file logging (the same lines in both) for one run folder."""
from __future__ import annotations

import logging
import sys


def setup_logging(log_file: str | None) -> logging.Logger:
    log = logging.getLogger("cl")
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file:
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
