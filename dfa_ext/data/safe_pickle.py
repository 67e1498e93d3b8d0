"""Loading pickled numpy data (the CIFAR batches) without letting the file run code.

``pickle.load`` calls whatever callable a file names (``os.system``, ``builtins.eval``...), so a
downloaded or hand-made "dataset" could execute anything. This unpickler resolves only the few
globals that numpy arrays, dtypes and byte strings need; any other global is refused.
"""

from __future__ import annotations

import builtins
import codecs
import io
import os
import pickle
from typing import Any

import numpy as np

from ..errors import DataError

_ARRAY = np.empty(0)
_RECONSTRUCT = _ARRAY.__reduce__()[0]       # numpy.(_)core.multiarray._reconstruct
_FROMBUFFER = _ARRAY.__reduce_ex__(5)[0]    # numpy.(_)core.numeric._frombuffer (protocol 5)
_SCALAR = np.float64(0).__reduce__()[0]     # numpy.(_)core.multiarray.scalar

# (module, name) -> object; numpy 1 pickles say numpy.core, numpy 2 ones numpy._core.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,   # bytes in protocol-2 pickles written by Python 3
    # Harmless data types only: not eval, exec, getattr, __import__...
    **{("builtins", name): getattr(builtins, name) for name in ("set", "frozenset", "bytearray", "complex")},
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _RECONSTRUCT
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _SCALAR
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _FROMBUFFER


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays and "
                                         "plain Python data are allowed") from None


def load_pickle(path: str | os.PathLike) -> Any:
    """The object pickled in ``path`` (Python 2 pickles read with ``encoding="bytes"``, as the
    CIFAR files need). Raises DataError naming the file if it is not a safe, readable pickle."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # corrupt files raise many types (EOFError, ValueError, ...)
        raise DataError(f"{os.fspath(path)}: not a readable data pickle ({exc})") from exc
