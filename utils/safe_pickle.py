"""Reading pickled data files without running code from them, in time and memory bounded by the file's size.

A pickle is a program: `pickle.load` calls whatever callables the file names, so a crafted data file (a CIFAR
batch, say) can run a shell command. `load` admits only what plain data needs: numpy arrays and scalars (and
the dtype they are built from), lists, tuples, dicts, bytes, strings, numbers, booleans and None. Anything else
the file asks for is refused before it is called, with one line naming the file and what it asked for.

Admitted callables are still dangerous with crafted arguments (numpy builds an array of any shape it is asked
for, and an object array from a short list crashes the process), so every call and every `__setstate__` is
checked against the form numpy itself writes before it runs: an array is first built empty, then given exactly
as many bytes of data as its shape needs, with a plain (numeric, bytes or str) dtype. The loader is pickle's
pure-Python one, whose opcodes can be checked one by one (it keeps its memo in a dict, and never recurses): about
0.5 s per MB at worst. Dict keys must be atomic (hashing a crafted tuple can take forever) and sets are refused.

The result is checked again afterwards, without recursion and visiting each object once: nothing but those
types, no reference cycle, at most `MAX_DEPTH` levels, and, counting every shared reference where it is used
(a pickle stores a shared object once, so a 1 KB file can hold a list that expands to 2**40 items), at most
`MAX_ITEMS` items and `max_bytes(file size)` bytes: whatever walks the data afterwards (numpy, a loop over
labels) stays bounded too.
"""
from __future__ import annotations

import codecs
import io
import itertools
import math
import os
import pickle
import re

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
_CONTAINERS = (list, tuple, dict)
_NUMBERS = frozenset((int, float, bool, type(None), complex))
#: dtype kinds a data file may hold: booleans, integers, floats, complex numbers, bytes and str.
_KINDS = "biufcSU"
#: A dtype as numpy names it in a pickle ('u1', 'f4', 'S10', 'U10'), optionally with a byte order.
_DTYPE_NAME = re.compile(r"[<>|=]?[a-zA-Z?]\d{0,9}")

MAX_DEPTH = 100
#: Items (list and tuple entries, dict keys and values) of the data, each shared reference counted where it is used.
MAX_ITEMS = 10_000_000


def max_bytes(file_size: int) -> int:
    """Bytes of data (strings, bytes, arrays) that a file of `file_size` bytes may expand to, shared references
    counted where they are used: a real data file holds each of them once, so a little more than its size."""
    return 64 * 2**20 + 16 * file_size


class _Refused(Exception):
    """What the file asks for that plain data never does (completes 'it ...')."""


def _text(value):
    """A name read from a Python 2 pickle with encoding='bytes' is bytes."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def _count(shape) -> int:
    """The element count of an array shape given in the file (a tuple of non-negative ints), else refused."""
    if not isinstance(shape, tuple) or len(shape) > 32 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise _Refused("gives a numpy array a malformed shape")
    return math.prod(shape)


def _plain_dtype(dtype) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _KINDS or dtype.hasobject or dtype.fields is not None \
            or dtype.subdtype is not None or dtype.itemsize == 0:
        raise _Refused(f"asks for a numpy array or scalar of dtype {dtype}")
    return dtype


def _check_size(data, dtype: np.dtype, count: int) -> None:
    """`data` must be exactly the bytes `count` items of `dtype` take (numpy would read past a short buffer)."""
    if not isinstance(data, (bytes, bytearray, str)):
        raise _Refused(f"gives a numpy array its data as a {type(data).__name__}")
    if len(data) != count * dtype.itemsize:
        raise _Refused(f"gives a numpy array of {count} {dtype} items {len(data)} bytes of data")


def _reduce(func, args):
    """Call one of the ALLOWED callables with `args`, in the form numpy writes; anything else is refused."""
    if not isinstance(args, tuple):
        raise _Refused("calls a function with malformed arguments")
    if func is _multiarray._reconstruct:  # (ndarray, (0,), b'b'): an empty array, given its data by __setstate__
        if len(args) != 3 or args[0] is not np.ndarray or _count(args[1]) != 0 or \
                not isinstance(_text(args[2]), str) or not _DTYPE_NAME.fullmatch(_text(args[2])):
            raise _Refused("asks numpy to build an array before its data (it could take any memory)")
    elif func is np.dtype:  # ('u1', False, True)
        if not 1 <= len(args) <= 3 or not isinstance(_text(args[0]), str) or \
                not _DTYPE_NAME.fullmatch(_text(args[0])) or not all(isinstance(a, int) for a in args[1:]):
            raise _Refused("asks for a numpy dtype that is not a plain number, bytes or str type")
        return _plain_dtype(np.dtype(_text(args[0]), *map(bool, args[1:])))
    elif func is _multiarray.scalar:  # (dtype, its bytes)
        if len(args) != 2:
            raise _Refused("asks for a numpy scalar with malformed arguments")
        _check_size(args[1], _plain_dtype(args[0]), 1)
    elif func is _numeric._frombuffer:  # (buffer, dtype, shape, order), protocol 5
        if len(args) != 4 or args[3] not in ("C", "F"):
            raise _Refused("asks for a numpy array with malformed arguments")
        _check_size(args[0], _plain_dtype(args[1]), _count(args[2]))
    elif func is np.ndarray:
        raise _Refused("asks to call numpy.ndarray directly (it could take any memory)")
    elif func is not _latin1_encode:
        raise _Refused(f"asks to call a {type(func).__name__}")
    return func(*args)


def _build(inst, state) -> None:
    """`inst.__setstate__(state)` for an array or a dtype, in the form numpy writes; anything else is refused."""
    if type(inst) is np.ndarray:  # (1, shape, dtype, is_fortran, raw bytes)
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[3], (bool, int)):
            raise _Refused("gives a numpy array a malformed state")
        _check_size(state[4], _plain_dtype(state[2]), _count(state[1]))
        inst.__setstate__(state)
    elif isinstance(inst, np.dtype):  # (3, byte order, None, None, None, item size, alignment, flags)
        order = _text(state[1]) if isinstance(state, tuple) and len(state) >= 5 else None
        if order not in ("<", ">", "|", "=") or state[0] not in (3, 4) or state[2:5] != (None, None, None):
            raise _Refused("gives a numpy dtype a state numpy never writes (fields, a subarray or no byte order)")
        # Only the byte order is taken from the file: the rest of the state (item size, alignment, flags, which
        # numpy trusts: flags can mark uint8 as holding objects) is what numpy writes for this dtype.
        inst.__setstate__(inst.newbyteorder(order).__reduce__()[2])
    else:
        raise _Refused(f"asks to set the state of a {type(inst).__name__}")


def _key(key):
    """A dict key: atomic (a crafted tuple key could take forever to hash)."""
    if not isinstance(key, (*_PLAIN, np.generic)):
        raise _Refused(f"holds a dict key that is a {type(key).__name__}")
    return key


def _refuse(what: str):
    def opcode(self):
        raise _Refused(what)
    return opcode


class _DataUnpickler(pickle._Unpickler):  # noqa: SLF001 - the pure-Python unpickler lets each opcode be checked
    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"asks to call {module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused("asks for a persistent object id")

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = _reduce(self.stack[-1], args)

    def load_build(self):
        state = self.stack.pop()
        _build(self.stack[-1], state)

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self.stack[-1][_key(key)] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[_key(items[i])] = items[i + 1]

    def load_dict(self):
        items = self.pop_mark()
        self.append({_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    dispatch = {
        **pickle._Unpickler.dispatch,  # noqa: SLF001
        pickle.REDUCE[0]: load_reduce, pickle.BUILD[0]: load_build, pickle.SETITEM[0]: load_setitem,
        pickle.SETITEMS[0]: load_setitems, pickle.DICT[0]: load_dict,
        **{op[0]: _refuse("asks to build an object of a class") for op in
           (pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ, pickle.INST)},
        **{op[0]: _refuse("holds a set") for op in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET)},
    }


def _leaf(obj) -> int | str:
    """The bytes of data an object that holds no other objects stands for, or why it is refused."""
    if isinstance(obj, (bytes, str)):
        return len(obj)
    if isinstance(obj, _PLAIN):
        return 0
    if isinstance(obj, np.ndarray):
        return f"an array of dtype {obj.dtype}" if obj.dtype.hasobject else obj.nbytes
    if isinstance(obj, np.generic):
        return obj.dtype.itemsize if obj.dtype.kind in _KINDS else f"a numpy {obj.dtype} scalar"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


def check_structure(root, byte_limit: int, leaf=_leaf) -> str | None:
    """What in `root` is not plain data (`leaf`: the bytes an object that is no list, tuple or dict stands for, or
    why it is refused) or expands beyond the limits (None when nothing is). Also the check of what torch's
    weights-only loader returns (trainer/checkpoint.py), whose lists and dicts may share references as well.

    An iterative walk that measures each container once: its expansion (items, bytes, height) is kept by id (the
    objects stay alive meanwhile, inside `root`) and added wherever the container is referenced again."""
    expansion: dict[int, tuple[int, int, int]] = {}
    path: list[list] = []  # [container, its remaining entries, items, bytes, height] from the root down
    on_path: set[int] = set()

    def visit(obj):
        """obj's (items, bytes, height) when known now; None once a container is entered; a str when refused."""
        if not isinstance(obj, _CONTAINERS):
            size = leaf(obj)
            return size if isinstance(size, str) else (0, size, 0)
        known = expansion.get(id(obj))
        if known is not None:
            return known
        if id(obj) in on_path:
            return "a container that holds itself (a reference cycle)"
        if len(path) >= MAX_DEPTH:
            return f"nesting deeper than {MAX_DEPTH} levels"
        entries = itertools.chain.from_iterable(obj.items()) if isinstance(obj, dict) else iter(obj)
        path.append([obj, entries, 0, 0, 0])
        on_path.add(id(obj))
        return None

    def over(top) -> str | None:
        if top[2] > MAX_ITEMS:
            return f"more than {MAX_ITEMS:,} items once its shared references are expanded"
        if top[3] > byte_limit:
            return f"more than {byte_limit:,} bytes of data once its shared references are expanded"
        return None

    def add(top, measured) -> str | None:
        """Count an entry's expansion into the container that holds it."""
        top[2] += 1 + measured[0]
        top[3] += measured[1]
        top[4] = max(top[4], measured[2])
        if len(path) + measured[2] > MAX_DEPTH:
            return f"nesting deeper than {MAX_DEPTH} levels"
        return over(top)

    measured = visit(root)
    if measured is not None:
        return measured if isinstance(measured, str) else None
    while path:
        top = path[-1]
        for entry in top[1]:
            kind = type(entry)
            if kind in _NUMBERS:  # the common case, kept fast: a number or a string in a list
                top[2] += 1
                continue
            if kind is bytes or kind is str:
                top[2] += 1
                top[3] += len(entry)
                continue
            measured = visit(entry)
            if measured is None:
                break  # entered: its entries first
            why = measured if isinstance(measured, str) else add(top, measured)
            if why:
                return why
        else:  # every entry measured
            path.pop()
            on_path.discard(id(top[0]))
            measured = expansion[id(top[0])] = (top[2], top[3], top[4] + 1)
            why = over(top) or (add(path[-1], measured) if path else None)
            if why:
                return why
    return None


def _load(file, source: str, encoding: str, size: int):
    try:
        obj = _DataUnpickler(file, encoding=encoding).load()
    except _Refused as err:
        raise UserError(f"'{source}' is refused: it {err}, which a plain data file never does (it may be crafted "
                        "to run code or exhaust memory); replace it with the original file") from None
    except Exception as err:  # noqa: BLE001 - truncated or not a pickle at all: the file cannot be used
        detail = str(err).splitlines()[0][:200] if str(err) else "truncated"
        raise UserError(f"'{source}' cannot be read as a pickled data file ({type(err).__name__}: {detail})") from None
    why = check_structure(obj, max_bytes(size))
    if why:
        raise UserError(f"'{source}' is refused: it holds {why}, which a plain data file never holds")
    return obj


def loads(data: bytes, source: str = "<bytes>", encoding: str = "bytes"):
    """Unpickle plain data from `data`; `source` names it in the error."""
    return _load(io.BytesIO(data), source, encoding, len(data))


def load(path: str, encoding: str = "bytes"):
    """Unpickle the plain data in the file at `path` (numpy arrays, lists, dicts, bytes, strings, numbers);
    anything else is a one-line `UserError` naming the file. `encoding` is pickle's, for Python 2 strings."""
    try:
        with open(path, "rb") as f:
            return _load(f, path, encoding, os.fstat(f.fileno()).st_size)
    except OSError as err:
        raise UserError(f"'{path}' cannot be read: {err.strerror or err}") from None
