"""Torch's tensors inside a ``torch.save`` pickle, read without torch: its storage and dtype
names, and its tensor rebuild functions, as stand-ins for the restricted unpickler.

The pickle refers to storages through persistent ids ``('storage', <StorageType>, key, location,
numel)`` and rebuilds tensors with ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks[, metadata])``. Here a storage is a `Storage` (read from the archive
only when a tensor needs it) and a tensor a `TensorRef` (its geometry checked against the storage
while unpickling); `safe_pickle.materialize` turns each into a NumPy array.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from bitnet_jax.interop import safe_pickle
from bitnet_jax.interop.safe_pickle import CheckpointFormatError, UnsafeCheckpointError

# Storage classes of the pickle -> NumPy dtype of their elements.
STORAGE_DTYPES = {
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


def numpy_dtype(name: str) -> np.dtype:
  """NumPy dtype from a name of `STORAGE_DTYPES`/`_TORCH_DTYPES` (bfloat16 via ml_dtypes)."""
  if name == "bfloat16":
    try:
      import ml_dtypes  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # ml_dtypes ships with jax
      raise CheckpointFormatError(
          "the checkpoint holds bfloat16 tensors, which need the ml_dtypes package") from e
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class StorageType(safe_pickle.Marker):
  """Stand-in for `torch.FloatStorage` etc.: only carries the element dtype."""

  def __init__(self, qualname: str, dtype_name: str):
    super().__init__(qualname)
    self.dtype_name = dtype_name


class _TorchDtype(safe_pickle.Marker):
  """Stand-in for `torch.float32` etc."""

  def __init__(self, qualname: str, dtype_name: str):
    super().__init__(qualname)
    self.dtype_name = dtype_name


class Storage:
  """A storage of an archive, read only when a tensor needs it.

  Args:
    read: ``read(key, dtype, numel) -> (numel,) array``, the archive's reader.
    key, dtype, numel: the storage's name in the archive, element dtype and size.
  """

  def __init__(self, read: Callable[[str, np.dtype, int], np.ndarray], key: str,
               dtype: np.dtype, numel: int):
    self._read, self.key, self.dtype, self.numel = read, key, dtype, numel
    self._array = None

  def __setstate__(self, state):  # BUILD must not change a validated size or dtype
    raise UnsafeCheckpointError(f"the pickle tried to modify storage '{self.key}'; refused.")

  def array(self) -> np.ndarray:
    """The storage as a 1-D array of `numel` elements of `dtype` (native byte order)."""
    if self._array is None:
      self._array = self._read(self.key, self.dtype, self.numel)
    return self._array


def _last_element(offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> int:
  """Index of a strided view's last element in its storage (of a non-empty view)."""
  return offset + sum((n - 1) * s for n, s in zip(size, stride))


class TensorRef(safe_pickle.Deferred):
  """A tensor of the pickle, not materialised yet: (storage, offset, size, stride, dtype)."""

  def __init__(self, storage: Storage, offset, size, stride, dtype: np.dtype | None = None):
    if not isinstance(storage, Storage):
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
    if math.prod(size) and _last_element(offset, size, stride) >= view_numel:
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
    if _last_element(self.offset, self.size, self.stride) >= base.size:
      # checked at rebuild too; as_strided must never read past the end
      raise CheckpointFormatError(f"tensor overruns storage '{self.storage.key}'")
    item = self.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride))
    return np.array(view)  # a contiguous, writable copy


def _int_tuple(x, what: str) -> tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(isinstance(i, int) for i in x):
    raise CheckpointFormatError(f"tensor {what} must be a tuple of ints, got {x!r}")
  return tuple(x)


def _rebuild_tensor(storage, offset, size, stride):
  return TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
  del requires_grad, hooks, metadata  # autograd bookkeeping only
  return TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
  del requires_grad, hooks, metadata
  if not isinstance(dtype, _TorchDtype):
    raise CheckpointFormatError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
  return TensorRef(storage, offset, size, stride, numpy_dtype(dtype.dtype_name))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  del requires_grad, hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """Tensor subclasses / tensors with Python attributes: keep the plain tensor."""
  del new_type, state  # never instantiate the (possibly unknown) subclass
  if not isinstance(func, safe_pickle.SafeCallable):
    raise UnsafeCheckpointError(f"_rebuild_from_type_v2 with a refused function {func!r}")
  return func(*args)


def _torch_size(*args):
  dims = args[0] if args else ()
  return _int_tuple(tuple(dims), "torch.Size")


def _torch_device(*args):
  return ":".join(str(a) for a in args)  # 'cpu', 'cuda:0'


_TENSOR_TYPE = safe_pickle.Marker("torch.Tensor")


def allowed_globals() -> dict[tuple[str, str], Any]:
  """(module, name) -> stand-in, for every global of a ``torch.save`` pickle (the generic ones
  of `safe_pickle.allowed_globals` and torch's)."""
  allowed = safe_pickle.allowed_globals()
  allowed.update(safe_pickle.safe_callables({
      "torch._utils": {"_rebuild_tensor": _rebuild_tensor,
                       "_rebuild_tensor_v2": _rebuild_tensor_v2,
                       "_rebuild_tensor_v3": _rebuild_tensor_v3,
                       "_rebuild_parameter": _rebuild_parameter,
                       "_rebuild_parameter_with_state": _rebuild_parameter},
      "torch._tensor": {"_rebuild_from_type_v2": _rebuild_from_type_v2},
      "torch": {"Size": _torch_size, "device": _torch_device},
  }))
  for module in ("torch", "torch._tensor", "torch.nn.parameter"):
    allowed.update({(module, "Tensor"): _TENSOR_TYPE, (module, "Parameter"): _TENSOR_TYPE})
  allowed.update({("torch", name): StorageType(f"torch.{name}", dtype)
                  for name, dtype in STORAGE_DTYPES.items()})
  allowed[("torch.storage", "UntypedStorage")] = StorageType("torch.UntypedStorage", "uint8")
  allowed.update({("torch", name): _TorchDtype(f"torch.{name}", dtype)
                  for name, dtype in _TORCH_DTYPES.items()})
  return allowed
