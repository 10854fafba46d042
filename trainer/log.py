"""Console + file logging (the same lines in both) for one run folder. The log file is appended to in place, so
it is opened without following a link (`checkpoint.open_regular`): a run.log planted as a link in a shared or
copied run folder would make the run append to the file it points to."""
from __future__ import annotations

import logging
import os
import sys

from trainer.checkpoint import open_regular


class _RunLogHandler(logging.FileHandler):
    """logging.FileHandler (appending, closed with the handler) on a file opened by `open_regular`."""

    def _open(self):
        fd = open_regular(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "log file")
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def setup_logging(log_file: str | None, quiet: bool = False) -> logging.Logger:
    """The run's lines on stdout and in `log_file`; `quiet` (the other ranks of a distributed run): warnings on
    stderr only, no file."""
    log = logging.getLogger("cl")
    close_logging()
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr if quiet else sys.stdout)]
    if log_file and not quiet:
        handlers.append(_RunLogHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


def close_logging() -> None:
    log = logging.getLogger("cl")
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)
