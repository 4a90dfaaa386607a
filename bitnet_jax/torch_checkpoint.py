"""Reads the original release's PyTorch Lightning ``.ckpt`` files, and other pickles, safely.

A ``.ckpt`` is a ``torch.save`` zip archive::

    <archive>/data.pkl        the pickled object (protocol 2)
    <archive>/data/<key>      one raw storage per key (little-endian unless ``byteorder`` says)
    <archive>/version, <archive>/byteorder, ...

The pickle refers to storages through persistent ids ``('storage', <StorageType>, key, location,
numel)`` and rebuilds tensors with ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks[, metadata])``.

Safety. Unpickling runs whatever callables the file names, so this module never uses a plain
unpickler and never imports a module named by the file. ``_SafeUnpickler.find_class`` maps a
small allow-list of names (``collections.OrderedDict``, the tensor rebuild functions, storage
types, ``torch.Size``/dtypes/devices, ``argparse.Namespace`` and Lightning's ``AttributeDict``,
NumPy scalars and arrays, pathlib paths, a few harmless builtins) to stand-ins written here; the
tensors become NumPy arrays. Any other global is replaced by an inert marker class that is
never imported:

* referring to an unknown global without calling it is harmless and tolerated (PyTorch
  Lightning < 1.5 keys its ``callbacks`` dict by callback *classes*);
* calling / instantiating it (``REDUCE``, ``NEWOBJ``, ``INST``...) raises
  ``UnsafeCheckpointError`` naming the global (default, ``strict=True``), or with
  ``strict=False`` produces an inert ``UnknownObject`` that records its arguments and runs no
  code. With ``strict=False``, loading still fails if the state dict itself holds such an
  object; use it for checkpoints whose *other* entries (hyper-parameters, scheduler states)
  hold classes outside the allow-list.

Why not refuse every unknown name at once? A real Lightning checkpoint may reference classes it
never instantiates; refusing those would make genuine release checkpoints unreadable, while
tolerating an uncalled reference cannot run code. Why not ignore unknown calls by default? A
file that asks to call ``os.system`` is not a genuine checkpoint and should be reported loudly.

Tensors are read lazily: ``read_state_dict`` only reads the storages of the state dict, not
those of the optimizer states.

``load_pickle`` reads a plain pickle (no archive, no storages) with the same allow-list: the
CIFAR python batches (`datasets.py`) go through it, so the project has one restricted unpickler.

The release's layout and its mapping to our parameters are in `release.py`; writing a ``.ckpt``
in that layout is `export.py`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pathlib
import pickle
import zipfile
import zlib
from typing import Any

import numpy as np

__all__ = [
    "CheckpointFormatError",
    "HParams",
    "UnknownObject",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "load_pickle",
    "read_state_dict",
]


class UnsafeCheckpointError(ValueError):
  """The pickle asked for something outside the allow-list (it was not executed)."""


class CheckpointFormatError(ValueError):
  """The file is not a readable ``torch.save`` zip archive, or its contents are inconsistent."""


# ============================================================================ reading

# Storage classes of the pickle -> NumPy dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",  # bytes; `_rebuild_tensor_v3` gives the element dtype
}

# `torch.<name>` dtype objects (used by `_rebuild_tensor_v3`) -> NumPy dtype names.
_TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "bool": "bool",
    "complex64": "complex64", "cfloat": "complex64", "complex128": "complex128",
    "cdouble": "complex128",
}

# Module paths under which Lightning has defined `AttributeDict` (a dict with attribute access).
_ATTRIBUTE_DICT_MODULES = (
    "pytorch_lightning.utilities.parsing",
    "pytorch_lightning.utilities.data",
    "lightning.pytorch.utilities.parsing",
    "lightning_fabric.utilities.data",
    "lightning.fabric.utilities.data",
)


def _numpy_dtype(name: str) -> np.dtype:
  """NumPy dtype from a name of `_STORAGE_DTYPES`/`_TORCH_DTYPES` (bfloat16 via ml_dtypes)."""
  if name == "bfloat16":
    try:
      import ml_dtypes  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # ml_dtypes ships with jax
      raise CheckpointFormatError(
          "the checkpoint holds bfloat16 tensors, which need the ml_dtypes package") from e
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class _Marker:
  """A named, inert stand-in for a class the pickle only passes around (e.g. torch.Tensor)."""

  def __init__(self, qualname: str):
    self.qualname = qualname

  def __repr__(self):
    return f"<{self.qualname}>"

  def __setstate__(self, state):
    raise UnsafeCheckpointError(f"the pickle tried to modify {self.qualname}; refused.")


class _StorageType(_Marker):
  """Stand-in for `torch.FloatStorage` etc.: only carries the element dtype."""

  def __init__(self, qualname: str, dtype_name: str):
    super().__init__(qualname)
    self.dtype_name = dtype_name


class _TorchDtype(_Marker):
  """Stand-in for `torch.float32` etc."""

  def __init__(self, qualname: str, dtype_name: str):
    super().__init__(qualname)
    self.dtype_name = dtype_name


class _SafeCallable:
  """A callable stand-in for an allowed global; the pickle cannot modify it."""

  def __init__(self, qualname: str, fn):
    self.qualname = qualname
    self._fn = fn

  def __call__(self, *args):
    try:
      return self._fn(*args)
    except (UnsafeCheckpointError, CheckpointFormatError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointFormatError(
          f"{self.qualname} called with unexpected arguments {_short_repr(args)}: {e}") from e

  def __setstate__(self, state):
    raise UnsafeCheckpointError(f"the pickle tried to modify {self.qualname}; refused.")

  def __repr__(self):
    return f"<safe stand-in for {self.qualname}>"


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


class _UnknownGlobal:
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


class _Storage:
  """A storage of the archive, read from the zip only when a tensor needs it."""

  def __init__(self, reader: "_ArchiveReader", key: str, dtype: np.dtype, numel: int):
    self.reader, self.key, self.dtype, self.numel = reader, key, dtype, numel
    self._array = None

  def __setstate__(self, state):  # BUILD must not change a validated size or dtype
    raise UnsafeCheckpointError(f"the pickle tried to modify storage '{self.key}'; refused.")

  def array(self) -> np.ndarray:
    """The storage as a 1-D array of `numel` elements of `dtype` (native byte order)."""
    if self._array is None:
      self._array = self.reader.read_storage(self.key, self.dtype, self.numel)
    return self._array


class _TensorRef:
  """A tensor of the pickle, not materialised yet: (storage, offset, size, stride, dtype)."""

  def __init__(self, storage: _Storage, offset, size, stride, dtype: np.dtype | None = None):
    if not isinstance(storage, _Storage):
      raise CheckpointFormatError(f"tensor rebuilt from a non-storage {type(storage).__name__}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
      raise CheckpointFormatError(f"tensor size {size} and stride {stride} differ in length")
    if not isinstance(offset, int) or offset < 0 or any(s < 0 for s in size + stride):
      raise CheckpointFormatError(
          f"bad tensor geometry: offset {offset!r}, size {size}, stride {stride}")
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.dtype = storage.dtype if dtype is None else dtype
    # Check the extent now, so that a corrupt file fails while unpickling.
    view_numel = storage.numel * storage.dtype.itemsize // self.dtype.itemsize
    if math.prod(size):
      last = offset + sum((n - 1) * s for n, s in zip(size, stride))
      if last >= view_numel:
        raise CheckpointFormatError(
            f"tensor (offset {offset}, size {size}, stride {stride}) overruns storage "
            f"'{storage.key}' of {view_numel} elements")

  def __setstate__(self, state):  # BUILD must not change the validated geometry
    raise UnsafeCheckpointError("the pickle tried to modify a tensor; refused.")

  def materialize(self) -> np.ndarray:
    base = self.storage.array()
    if self.dtype != base.dtype:  # `_rebuild_tensor_v3`: bytes viewed as the tensor dtype
      nbytes = base.size * base.dtype.itemsize
      base = base.view(np.uint8)[:nbytes - nbytes % self.dtype.itemsize].view(self.dtype)
    if not math.prod(self.size):
      return np.zeros(self.size, self.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= base.size:  # checked at rebuild too; as_strided must never read past the end
      raise CheckpointFormatError(f"tensor overruns storage '{self.storage.key}'")
    item = self.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride))
    return np.array(view)  # a contiguous, writable copy


def _int_tuple(x, what: str) -> tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(isinstance(i, int) for i in x):
    raise CheckpointFormatError(f"tensor {what} must be a tuple of ints, got {x!r}")
  return tuple(x)


def _short_repr(x, n: int = 200) -> str:
  r = repr(x)
  return r if len(r) <= n else r[:n] + "..."


def _rebuild_tensor(storage, offset, size, stride):
  return _TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
  del requires_grad, hooks, metadata  # autograd bookkeeping only
  return _TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
  del requires_grad, hooks, metadata
  if not isinstance(dtype, _TorchDtype):
    raise CheckpointFormatError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
  return _TensorRef(storage, offset, size, stride, _numpy_dtype(dtype.dtype_name))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  del requires_grad, hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """Tensor subclasses / tensors with Python attributes: keep the plain tensor."""
  del new_type, state  # never instantiate the (possibly unknown) subclass
  if not isinstance(func, _SafeCallable):
    raise UnsafeCheckpointError(f"_rebuild_from_type_v2 with a refused function {func!r}")
  return func(*args)


def _torch_size(*args):
  dims = args[0] if args else ()
  return _int_tuple(tuple(dims), "torch.Size")


def _torch_device(*args):
  return ":".join(str(a) for a in args)  # 'cpu', 'cuda:0'


def _codecs_encode(text, encoding="utf-8", errors="strict"):
  """Protocol-2 pickles store ``bytes`` as ``_codecs.encode(latin1_str, 'latin1')``."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
    raise UnsafeCheckpointError(f"refused _codecs.encode{_short_repr((text, encoding))}")
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


def _np_reconstruct(subtype, shape, code):
  del shape, code
  if subtype is not _NDARRAY:
    raise UnsafeCheckpointError(f"numpy _reconstruct of {subtype!r} refused")
  # BUILD then calls NumPy's own ndarray.__setstate__ with a dtype made by `_np_dtype`.
  return np.ndarray.__new__(np.ndarray, (0,), "b")


def _pure_path(cls):
  def make(*parts):
    if not all(isinstance(p, str) for p in parts):
      raise UnsafeCheckpointError(f"path from non-strings {_short_repr(parts)} refused")
    return str(cls(*parts))
  return make


_NDARRAY = _Marker("numpy.ndarray")
_TENSOR_TYPE = _Marker("torch.Tensor")


def _allowed_globals() -> dict[tuple[str, str], Any]:
  """(module, name) -> stand-in, for every global this loader accepts."""
  allowed: dict[tuple[str, str], Any] = {}

  def fn(module, name, f):
    allowed[(module, name)] = _SafeCallable(f"{module}.{name}", f)

  fn("collections", "OrderedDict", collections.OrderedDict)
  fn("torch._utils", "_rebuild_tensor", _rebuild_tensor)
  fn("torch._utils", "_rebuild_tensor_v2", _rebuild_tensor_v2)
  fn("torch._utils", "_rebuild_tensor_v3", _rebuild_tensor_v3)
  fn("torch._utils", "_rebuild_parameter", _rebuild_parameter)
  fn("torch._utils", "_rebuild_parameter_with_state", _rebuild_parameter)
  fn("torch._tensor", "_rebuild_from_type_v2", _rebuild_from_type_v2)
  fn("torch", "Size", _torch_size)
  fn("torch", "device", _torch_device)
  for module in ("torch", "torch._tensor", "torch.nn.parameter"):
    for name in ("Tensor", "Parameter"):
      allowed[(module, name)] = _TENSOR_TYPE
  for name, dt in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(f"torch.{name}", dt)
  allowed[("torch.storage", "UntypedStorage")] = _StorageType("torch.UntypedStorage", "uint8")
  for name, dt in _TORCH_DTYPES.items():
    allowed[("torch", name)] = _TorchDtype(f"torch.{name}", dt)
  fn("builtins", "set", set)
  fn("builtins", "frozenset", frozenset)
  fn("builtins", "complex", complex)
  fn("builtins", "bytes", _bytes)
  fn("builtins", "bytearray", _bytearray)
  fn("_codecs", "encode", _codecs_encode)
  allowed[("argparse", "Namespace")] = HParams
  for module in _ATTRIBUTE_DICT_MODULES:
    allowed[(module, "AttributeDict")] = HParams
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    fn(module, "scalar", _np_scalar)
    fn(module, "_reconstruct", _np_reconstruct)
  fn("numpy", "dtype", _np_dtype)
  allowed[("numpy", "ndarray")] = _NDARRAY
  for name in ("PurePosixPath", "PosixPath", "Path"):
    fn("pathlib", name, _pure_path(pathlib.PurePosixPath))
  for name in ("PureWindowsPath", "WindowsPath"):
    fn("pathlib", name, _pure_path(pathlib.PureWindowsPath))
  return allowed


class _SafeUnpickler(pickle.Unpickler):
  """An unpickler that resolves globals only to the stand-ins of `_allowed_globals`."""

  def __init__(self, file, archive: "_ArchiveReader | None", strict: bool,
               encoding: str = "ASCII"):
    super().__init__(file, encoding=encoding)
    self._archive = archive  # None: a plain pickle, which has no storages
    self._strict = strict
    self._allowed = _allowed_globals()
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
          f"Refused[{qualname}]", (_UnknownGlobal,),
          {"_qualname": qualname, "_strict": self._strict, "__module__": __name__})
    return self._unknown[qualname]

  def persistent_load(self, pid):
    if self._archive is None:
      raise UnsafeCheckpointError(f"refused persistent id {_short_repr(pid)} in a plain pickle")
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise UnsafeCheckpointError(
          f"refused persistent id {_short_repr(pid)}: expected ('storage', type, key, "
          "location, numel)")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f"refused storage type {storage_type!r}")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise CheckpointFormatError(f"bad storage reference {_short_repr(pid)}")
    return self._archive.storage(key, _numpy_dtype(storage_type.dtype_name), numel)


class _ArchiveReader:
  """The zip archive of a ``torch.save`` file."""

  def __init__(self, path: str):
    self.path = path
    try:
      self.zip = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
      with open(path, "rb") as f:
        head = f.read(64)
      hint = ""
      if head[:2] == b"\x80\x02":  # pre-1.6 torch.save: a bare pickle stream, no zip
        hint = (" It starts like a legacy (torch < 1.6) non-zip file; re-save it with a "
                "recent torch.save to read it here.")
      raise CheckpointFormatError(
          f"{path} is not a torch.save zip archive (a .ckpt should be a zip file).{hint}") from e
    try:
      self._index()
    except BaseException:
      self.zip.close()
      raise

  def _index(self):
    """Finds data.pkl, the archive's folder prefix and its byte order."""
    path = self.path
    names = self.zip.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pkl:
      raise CheckpointFormatError(
          f"{path} is a zip file but has no data.pkl entry; found {names[:10]}"
          f'{"..." if len(names) > 10 else ""}. Is it a torch.save checkpoint?')
    self.pkl_name = min(pkl, key=len)
    self.prefix = self.pkl_name[:-len("data.pkl")]  # 'archive/' (or '' for a flat zip)
    byteorder = "little"
    if self.prefix + "byteorder" in names:
      byteorder = self.zip.read(self.prefix + "byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise CheckpointFormatError(f"{path}: byteorder entry must be little or big, got "
                                    f"{byteorder!r}")
    self.byteorder = byteorder
    self._storages: dict[str, _Storage] = {}

  def close(self):
    self.zip.close()

  def load_pickle(self, strict: bool):
    try:
      data = self.zip.read(self.pkl_name)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
      raise CheckpointFormatError(f"{self.path}: cannot read {self.pkl_name}: {e}") from e
    unpickler = _SafeUnpickler(io.BytesIO(data), self, strict)
    try:
      return unpickler.load()
    except (UnsafeCheckpointError, CheckpointFormatError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointFormatError(f"{self.path}: corrupt pickle in {self.pkl_name}: "
                                  f"{type(e).__name__}: {e}") from e

  def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
    if key in self._storages:
      st = self._storages[key]
      if st.dtype.itemsize * st.numel != dtype.itemsize * numel:
        raise CheckpointFormatError(f"storage '{key}' referenced with two different sizes")
      return st
    name = f"{self.prefix}data/{key}"
    try:
      info = self.zip.getinfo(name)
    except KeyError:
      raise CheckpointFormatError(f"{self.path}: the pickle refers to storage {name}, which "
                                  "is not in the archive") from None
    if info.file_size != numel * dtype.itemsize:
      raise CheckpointFormatError(
          f"{self.path}: storage {name} should hold {numel} x {dtype.itemsize} bytes = "
          f"{numel * dtype.itemsize} bytes, found {info.file_size}")
    st = _Storage(self, key, dtype, numel)
    self._storages[key] = st
    return st

  def read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f"{self.prefix}data/{key}"
    try:
      buf = self.zip.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
      raise CheckpointFormatError(f"{self.path}: cannot read {name}: {e}") from e
    if len(buf) != numel * dtype.itemsize:
      raise CheckpointFormatError(f"{self.path}: {name} has {len(buf)} bytes, expected "
                                  f"{numel * dtype.itemsize}")
    if self.byteorder == "big" and dtype.itemsize > 1:
      unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
      buf = np.frombuffer(buf, np.uint8).reshape(-1, unit)[:, ::-1].tobytes()
    return np.frombuffer(buf, dtype=dtype, count=numel)


def _materialize(obj, memo=None):
  """Replaces every `_TensorRef` in nested containers by its NumPy array."""
  if memo is None:
    memo = {}
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _TensorRef):
    out = obj.materialize()
  elif isinstance(obj, _UnknownGlobal):
    out = obj.__dict__["_record"]
  elif isinstance(obj, dict):  # dict, OrderedDict, HParams: keep the type
    out = type(obj)()
    memo[id(obj)] = out
    for k, v in obj.items():
      out[k] = _materialize(v, memo)
  elif isinstance(obj, list):
    out = []
    memo[id(obj)] = out
    out.extend(_materialize(v, memo) for v in obj)
  elif isinstance(obj, tuple):
    out = tuple(_materialize(v, memo) for v in obj)
  else:
    out = obj
  memo[id(obj)] = out
  return out


def _open(path) -> _ArchiveReader:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if os.path.isdir(path):
    raise CheckpointFormatError(f"{path} is a directory, expected a .ckpt file")
  return _ArchiveReader(path)


def load_checkpoint(path, *, strict: bool = True) -> Any:
  """Loads a whole ``torch.save`` file safely, tensors as NumPy arrays.

  Args:
    path: the ``.ckpt`` / ``.pt`` file.
    strict: see the module docstring; with False, calls to globals outside the allow-list
      become inert `UnknownObject` records instead of raising.

  Returns:
    The unpickled object with containers as dicts/lists/tuples, tensors as NumPy arrays
    (bfloat16 as ``ml_dtypes.bfloat16``), ``argparse.Namespace``/``AttributeDict`` as
    `HParams` dicts.

  Raises:
    FileNotFoundError: no such file.
    CheckpointFormatError: not a torch.save zip, or corrupt.
    UnsafeCheckpointError: the pickle calls a global outside the allow-list (strict).
  """
  archive = _open(path)
  try:
    return _materialize(archive.load_pickle(strict))
  finally:
    archive.close()


def read_state_dict(path, *, strict: bool = True) -> dict[str, np.ndarray]:
  """Reads the ``state_dict`` of a Lightning checkpoint (or a bare ``torch.save``'d one).

  Only the state dict's storages are read from the archive.

  Args:
    path: the ``.ckpt`` file.
    strict: see `load_checkpoint`.

  Returns:
    ``{key: np.ndarray}`` in the file's order and dtypes (e.g.
    ``'model.begin.layer.weight'`` -> float32 ``(64fs, 3, 3, 3)``).

  Raises:
    FileNotFoundError: no such file.
    CheckpointFormatError: not a torch.save zip, corrupt, no state dict in it, or a state-dict
      entry that is not a tensor.
    UnsafeCheckpointError: refused global (see the module docstring), also inside the state
      dict with ``strict=False``.
  """
  archive = _open(path)
  try:
    obj = archive.load_pickle(strict)
    if isinstance(obj, dict) and "state_dict" in obj:
      sd = obj["state_dict"]
      if not isinstance(sd, dict):
        raise CheckpointFormatError(
            f"{path}: 'state_dict' must be a dict of tensors, found {type(sd).__name__}")
    elif isinstance(obj, dict) and obj and all(isinstance(v, _TensorRef) for v in obj.values()):
      sd = obj  # a bare state dict saved with torch.save(model.state_dict())
    else:
      keys = list(obj)[:20] if isinstance(obj, dict) else None
      raise CheckpointFormatError(
          f"{path}: no 'state_dict' entry; expected a Lightning checkpoint (a dict with "
          f"'state_dict') or a dict of tensors, found {type(obj).__name__}"
          + (f" with keys {keys}" if keys is not None else ""))
    bad = {str(k): repr(v) for k, v in sd.items() if not isinstance(v, _TensorRef)}
    if bad:
      error = CheckpointFormatError
      if any(isinstance(v, (_UnknownGlobal, type)) for v in sd.values()):
        error = UnsafeCheckpointError  # refused objects must never pass as weights
      raise error(f"{path}: state dict entries that are not tensors: {_short_repr(bad, 500)}")
    return {str(k): v.materialize() for k, v in sd.items()}
  finally:
    archive.close()


def load_pickle(file, *, encoding: str = "ASCII") -> Any:
  """Unpickles a plain pickle (not a ``torch.save`` archive) with the same allow-list.

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
  return _materialize(_SafeUnpickler(file, None, strict=True, encoding=encoding).load())
