"""The one restricted unpickler: pickles read without running what they name.

Unpickling runs whatever callables the file names, so this module never uses a plain unpickler
and never imports a module named by the file. `SafeUnpickler.find_class` maps an allow-list of
names to stand-ins written here (and, for torch's tensors, in `torch_tensors.py`); any other
global becomes an inert marker class that is never imported:

* referring to an unknown global without calling it is harmless and tolerated (PyTorch
  Lightning < 1.5 keys its ``callbacks`` dict by callback *classes*);
* calling / instantiating it (``REDUCE``, ``NEWOBJ``, ``INST``...) raises
  `UnsafeCheckpointError` naming the global (default, ``strict=True``), or with
  ``strict=False`` produces an inert `UnknownObject` that records its arguments and runs no
  code. With ``strict=False``, loading a state dict still fails if it holds such an object; use
  it for checkpoints whose *other* entries (hyper-parameters, scheduler states) hold classes
  outside the allow-list.

Why not refuse every unknown name at once? A real Lightning checkpoint may reference classes it
never instantiates; refusing those would make genuine release checkpoints unreadable, while
tolerating an uncalled reference cannot run code. Why not ignore unknown calls by default? A
file that asks to call ``os.system`` is not a genuine checkpoint and should be reported loudly.

The allow-list here holds what any pickle may need: ``collections.OrderedDict``, a few harmless
builtins, ``bytes`` as protocol 2 writes them, NumPy scalars, dtypes and arrays, pathlib paths,
and ``argparse.Namespace`` / Lightning's ``AttributeDict`` (as `HParams` dicts). `load_pickle`
reads a plain pickle with it: the CIFAR python batches go through it.

Module API: `UnsafeCheckpointError`, `CheckpointFormatError`, `HParams`, `UnknownObject`,
`load_pickle`; for the torch reader: `SafeUnpickler`, `allowed_globals`, `safe_callables`,
`Marker`, `SafeCallable`, `UnknownGlobal`, `Deferred`, `materialize`, `short_repr`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pathlib
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bitnet_jax import errors

# Module paths under which Lightning has defined `AttributeDict` (a dict with attribute access).
_ATTRIBUTE_DICT_MODULES = (
    "pytorch_lightning.utilities.parsing",
    "pytorch_lightning.utilities.data",
    "lightning.pytorch.utilities.parsing",
    "lightning_fabric.utilities.data",
    "lightning.fabric.utilities.data",
)


class UnsafeCheckpointError(errors.UserError, ValueError):
  """The pickle asked for something outside the allow-list (it was not executed)."""


class CheckpointFormatError(errors.UserError, ValueError):
  """The file is not a readable ``torch.save`` zip archive, or its contents are inconsistent."""


def short_repr(x, n: int = 200) -> str:
  """``repr(x)``, cut to `n` characters, for error messages."""
  r = repr(x)
  return r if len(r) <= n else r[:n] + "..."


class Marker:
  """A named, inert stand-in for a class the pickle only passes around (e.g. torch.Tensor)."""

  def __init__(self, qualname: str):
    self.qualname = qualname

  def __repr__(self):
    return f"<{self.qualname}>"

  def __setstate__(self, state):
    raise UnsafeCheckpointError(f"the pickle tried to modify {self.qualname}; refused.")


class SafeCallable:
  """A callable stand-in for an allowed global; the pickle cannot modify it."""

  def __init__(self, qualname: str, fn: Callable):
    self.qualname = qualname
    self._fn = fn

  def __call__(self, *args):
    try:
      return self._fn(*args)
    except (UnsafeCheckpointError, CheckpointFormatError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointFormatError(
          f"{self.qualname} called with unexpected arguments {short_repr(args)}: {e}") from e

  def __setstate__(self, state):
    raise UnsafeCheckpointError(f"the pickle tried to modify {self.qualname}; refused.")

  def __repr__(self):
    return f"<safe stand-in for {self.qualname}>"


class Deferred:
  """A value the unpickler builds later (a tensor, read from its storage by `materialize`)."""

  def materialize(self) -> Any:
    raise NotImplementedError


class HParams(dict):
  """Stand-in for ``argparse.Namespace`` and Lightning's ``AttributeDict``: a plain dict."""

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict_state, slot_state)
      state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
      raise CheckpointFormatError(f"hyper-parameters state must be a dict, got {type(state)}")
    self.update(state)


class UnknownObject:
  """What a call to a global outside the allow-list gives with ``strict=False``: inert data.

  Attributes:
    qualname: 'module.name' of the refused global.
    args: the positional arguments it was called with.
    state: what the pickle tried to set with BUILD (or None).
    items: what the pickle tried to append / set as items.
  """

  def __init__(self, qualname: str, args: tuple):
    self.qualname = qualname
    self.args = args
    self.state = None
    self.items = []

  def __repr__(self):
    return f"UnknownObject({self.qualname})"


class UnknownGlobal:
  """Base of the marker classes made for globals outside the allow-list (never imported).

  The marker is a class, because the ``NEWOBJ`` opcode only accepts classes. Creating an
  instance raises `UnsafeCheckpointError` in strict mode; otherwise it becomes an inert
  `UnknownObject`-like record.
  """
  _qualname = "?"
  _strict = True

  def __new__(cls, *args, **kwargs):
    if cls._strict:
      raise UnsafeCheckpointError(
          f"refused global '{cls._qualname}': the checkpoint asks to call it, and it is not "
          "on the allow-list of this loader (nothing was executed). If you trust that it only "
          "appears outside the state dict (e.g. in hyper-parameters), read with strict=False, "
          "which keeps it as inert data.")
    obj = object.__new__(cls)
    obj.__dict__["_record"] = UnknownObject(cls._qualname, args + tuple(kwargs.items()))
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.__dict__["_record"].state = state

  def append(self, item):
    self.__dict__["_record"].items.append(item)

  def extend(self, items):
    self.__dict__["_record"].items.extend(items)

  def __setitem__(self, key, value):
    self.__dict__["_record"].items.append((key, value))

  def __repr__(self):
    return f"UnknownObject({self._qualname})"


# ------------------------------------------------------------------------------------------
# The stand-ins of the generic allow-list.


def _codecs_encode(text, encoding="utf-8", errors_="strict"):
  """Protocol-2 pickles store ``bytes`` as ``_codecs.encode(latin1_str, 'latin1')``."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors_ != "strict":
    raise UnsafeCheckpointError(f"refused _codecs.encode{short_repr((text, encoding))}")
  return text.encode("latin1")


def _bytes(*args):
  if not args:
    return b""
  return _codecs_encode(*args)


def _bytearray(*args):
  return bytearray(_bytes(*args))


def _np_dtype(name, align=False, copy=False):
  del copy  # always a fresh copy: BUILD must not modify NumPy's shared dtype singletons
  if not isinstance(name, str):
    raise UnsafeCheckpointError(f"numpy.dtype of a non-string {name!r} refused")
  dt = np.dtype(name, align=bool(align), copy=True)
  if dt.hasobject:
    raise UnsafeCheckpointError(f"numpy object dtype {name!r} refused")
  return dt


def _np_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise UnsafeCheckpointError(f"numpy scalar of {dtype!r} refused")
  return np.frombuffer(data, dtype=dtype, count=1)[0]


_NDARRAY = Marker("numpy.ndarray")


def _np_reconstruct(subtype, shape, code):
  del shape, code
  if subtype is not _NDARRAY:
    raise UnsafeCheckpointError(f"numpy _reconstruct of {subtype!r} refused")
  # BUILD then calls NumPy's own ndarray.__setstate__ with a dtype made by `_np_dtype`.
  return np.ndarray.__new__(np.ndarray, (0,), "b")


def _pure_path(cls):
  def make(*parts):
    if not all(isinstance(p, str) for p in parts):
      raise UnsafeCheckpointError(f"path from non-strings {short_repr(parts)} refused")
    return str(cls(*parts))
  return make


def safe_callables(table: Mapping[str, Mapping[str, Callable]]
                   ) -> dict[tuple[str, str], SafeCallable]:
  """``{module: {name: function}}`` -> ``{(module, name): SafeCallable}`` for an allow-list."""
  return {(module, name): SafeCallable(f"{module}.{name}", fn)
          for module, names in table.items() for name, fn in names.items()}


def allowed_globals() -> dict[tuple[str, str], Any]:
  """(module, name) -> stand-in, for every global any pickle may name (torch's are apart)."""
  posix, windows = _pure_path(pathlib.PurePosixPath), _pure_path(pathlib.PureWindowsPath)
  numpy_multiarray = {"scalar": _np_scalar, "_reconstruct": _np_reconstruct}
  allowed: dict[tuple[str, str], Any] = safe_callables({
      "collections": {"OrderedDict": collections.OrderedDict},
      "builtins": {"set": set, "frozenset": frozenset, "complex": complex, "bytes": _bytes,
                   "bytearray": _bytearray},
      "_codecs": {"encode": _codecs_encode},
      "numpy": {"dtype": _np_dtype},
      "numpy.core.multiarray": numpy_multiarray,
      "numpy._core.multiarray": numpy_multiarray,
      "pathlib": {"PurePosixPath": posix, "PosixPath": posix, "Path": posix,
                  "PureWindowsPath": windows, "WindowsPath": windows},
  })
  allowed[("numpy", "ndarray")] = _NDARRAY
  allowed[("argparse", "Namespace")] = HParams
  allowed.update({(module, "AttributeDict"): HParams for module in _ATTRIBUTE_DICT_MODULES})
  return allowed


class SafeUnpickler(pickle.Unpickler):
  """An unpickler that resolves globals only to the stand-ins of `allowed`.

  A plain pickle has no persistent ids: a subclass that reads an archive's storages overrides
  `persistent_load`.
  """

  def __init__(self, file, allowed: Mapping[tuple[str, str], Any], strict: bool,
               encoding: str = "ASCII"):
    super().__init__(file, encoding=encoding)
    self._allowed = allowed
    self._strict = strict
    self._unknown: dict[str, type] = {}

  def find_class(self, module, name):
    # Protocol-2 pickles written by Python 3 use Python 2 names (`__builtin__.set`).
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
      module = _compat_pickle.IMPORT_MAPPING[module]
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    qualname = f"{module}.{name}"
    if qualname not in self._unknown:  # an inert class, never the real one
      self._unknown[qualname] = type(
          f"Refused[{qualname}]", (UnknownGlobal,),
          {"_qualname": qualname, "_strict": self._strict, "__module__": __name__})
    return self._unknown[qualname]

  def persistent_load(self, pid):
    raise UnsafeCheckpointError(f"refused persistent id {short_repr(pid)} in a plain pickle")


def materialize(obj, memo=None):
  """Replaces every `Deferred` in nested containers by its value, every refused call by its
  `UnknownObject` record."""
  if memo is None:
    memo = {}
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, Deferred):
    out = obj.materialize()
  elif isinstance(obj, UnknownGlobal):
    out = obj.__dict__["_record"]
  elif isinstance(obj, dict):  # dict, OrderedDict, HParams: keep the type
    out = type(obj)()
    memo[id(obj)] = out
    for k, v in obj.items():
      out[k] = materialize(v, memo)
  elif isinstance(obj, list):
    out = []
    memo[id(obj)] = out
    out.extend(materialize(v, memo) for v in obj)
  elif isinstance(obj, tuple):
    out = tuple(materialize(v, memo) for v in obj)
  else:
    out = obj
  memo[id(obj)] = out
  return out


def load_pickle(file, *, encoding: str = "ASCII") -> Any:
  """Unpickles a plain pickle (not a ``torch.save`` archive) with the allow-list above.

  Args:
    file: a binary file object.
    encoding: how Python 2 ``str`` objects are decoded (``"bytes"`` keeps them as bytes, as
      the CIFAR python batches need).

  Returns:
    The object; NumPy arrays come back as arrays.

  Raises:
    UnsafeCheckpointError: the pickle calls a global outside the allow-list, or refers to
      storages (it was not executed).
    pickle.UnpicklingError, EOFError, ValueError: a corrupt or truncated pickle.
  """
  return materialize(SafeUnpickler(file, allowed_globals(), strict=True,
                                   encoding=encoding).load())
