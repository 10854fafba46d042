"""Name -> object registries with explicit keys and "did you mean" errors."""
from __future__ import annotations

import difflib
import reprlib
from typing import Any, Callable, Iterator


class UserError(Exception):
    """An error caused by the user's input: main.py prints it as one line and exits non-zero."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, what a cluster scheduler sends to end a job: the run ends as on Ctrl-C (the files being written
    are left whole, the last checkpoint is kept), so the job can be resumed with --checkpoint_dir."""


class InvalidState(UserError):
    """Saved state (a checkpoint's) that does not fit what should load it; the message says what is wrong, the
    reader adds which file it came from."""


def closest(name: str, choices) -> str:
    """A ' (did you mean X?)' suffix for the closest of `choices`, or '' when nothing is close (nor for a name
    longer than any name: comparing a 5 MB value with each choice would take seconds)."""
    name = name if isinstance(name, str) else shorten(name)
    if len(name) > 200:
        return ""
    match = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def shorten(value: Any, limit: int = 80) -> str:
    """`value` quoted for a one-line error message: its repr (a newline in it cannot break the line), cut after
    `limit` characters with an ellipsis and its full length said, e.g. 'aaaa'… (5,000,000 characters). Only what
    is shown is formatted, so a huge or deeply nested value costs no more than a short one."""
    if isinstance(value, (str, bytes, bytearray)):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}… ({len(value):,} {'characters' if isinstance(value, str) else 'bytes'})"
    bounded = reprlib.Repr()  # a few items per container and a few levels ('...' for the rest)
    bounded.maxlevel, bounded.maxstring, bounded.maxlong, bounded.maxother = 3, limit, limit, limit
    try:
        text = bounded.repr(value)
    except ValueError:  # an int too long to print in decimal
        text = f"<an integer of {value.bit_length():,} bits>"
    if len(text) > limit:
        text = text[:limit] + "…"
    if isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > bounded.maxlist:
        text += f" ({len(value):,} items)"
    return text


class Registry:
    """Maps explicit lowercase names to objects; `register` is a decorator, `get` fails with the valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}

    def register(self, name: str, **meta) -> Callable[[Any], Any]:
        def decorator(obj):
            if name in self._entries:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            self._meta[name] = dict(meta, module=getattr(obj, "__module__", None))
            return obj

        return decorator

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise UserError(
                f"unknown {self.kind} {shorten(name)}{closest(name, self._entries)}; "
                f"valid {self.kind}s: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def meta(self, name: str) -> dict:
        self.get(name)
        return self._meta[name]

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.keys())})"


def import_submodules(package_name: str, package_path, skip: tuple[str, ...] = ()) -> None:
    """Import every module below a package (names starting with '_' are private and skipped), so that
    dropping a file into methods/, backbone/ or datasets/ registers it. Import errors are not hidden."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(package_path, prefix=package_name + "."):
        short = info.name.rsplit(".", 1)[-1]
        if not short.startswith("_") and short not in skip:
            importlib.import_module(info.name)
