"""Reading pickled data files without running code from them.

A pickle is a program: `pickle.load` calls whatever callables the file names, so a crafted data file (a CIFAR
batch, say) can run a shell command. `load` admits only what plain data needs: numpy arrays and scalars (and
the dtype they are built from), lists, tuples, dicts, bytes, strings, numbers, booleans and None. Anything else
the file asks for is refused before it is called, with one line naming the file and what it asked for; the
result is checked again afterwards (no object arrays, nothing but those types).
"""
from __future__ import annotations

import codecs
import io
import pickle

import numpy as np

from utils.registry import UserError

try:  # numpy >= 2 moved numpy.core to numpy._core; pickles name either
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


def _latin1_encode(text, encoding="latin1"):
    """Protocol-2 pickles written by Python 3 store bytes as `_codecs.encode(str, 'latin1')`; no other codec."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r}")
    return codecs.encode(text, "latin1")


#: (module, name) -> the object a plain-data pickle may reference.
ALLOWED = {
    **{(m, "_reconstruct"): _multiarray._reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _multiarray.scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _numeric._frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
_PLAIN = (bytes, str, int, float, bool, type(None), complex)


class _Refused(Exception):
    pass


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused("a persistent object id")


def _check_plain(obj, depth: int = 0) -> str | None:
    """What in `obj` is not plain data (None when everything is)."""
    if depth > 100:
        return "nesting deeper than 100 levels"
    if isinstance(obj, _PLAIN):
        return None
    if isinstance(obj, np.ndarray):
        return f"an array of dtype {obj.dtype}" if obj.dtype.hasobject else None
    if isinstance(obj, np.generic):
        return None if obj.dtype.kind in "biufcSU" else f"a numpy {obj.dtype} scalar"
    if isinstance(obj, (list, tuple)):
        return next((why for item in obj if (why := _check_plain(item, depth + 1))), None)
    if isinstance(obj, dict):
        return next((why for k, v in obj.items() if (why := _check_plain(k, depth + 1) or _check_plain(v, depth + 1))),
                    None)
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


def _load(file, source: str, encoding: str):
    try:
        obj = _DataUnpickler(file, encoding=encoding).load()
    except _Refused as err:
        raise UserError(f"'{source}' is refused: it asks to call {err}, which a plain data file never holds "
                        "(it may be crafted to run code); replace it with the original file") from None
    except Exception as err:  # noqa: BLE001 - truncated or not a pickle at all: the file cannot be used
        detail = str(err).splitlines()[0] if str(err) else "truncated"
        raise UserError(f"'{source}' cannot be read as a pickled data file ({type(err).__name__}: {detail})") from None
    why = _check_plain(obj)
    if why:
        raise UserError(f"'{source}' is refused: it holds {why}, which a plain data file never holds")
    return obj


def loads(data: bytes, source: str = "<bytes>", encoding: str = "bytes"):
    """Unpickle plain data from `data`; `source` names it in the error."""
    return _load(io.BytesIO(data), source, encoding)


def load(path: str, encoding: str = "bytes"):
    """Unpickle the plain data in the file at `path` (numpy arrays, lists, dicts, bytes, strings, numbers);
    anything else is a one-line `UserError` naming the file. `encoding` is pickle's, for Python 2 strings."""
    try:
        with open(path, "rb") as f:
            return _load(f, path, encoding)
    except OSError as err:
        raise UserError(f"'{path}' cannot be read: {err.strerror or err}") from None
