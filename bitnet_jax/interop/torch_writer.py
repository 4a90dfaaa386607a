"""Writes ``torch.save`` files without torch: the release's ``.ckpt`` format, for our weights.

`write_checkpoint` writes a zip archive in the layout `torch_reader.py` describes, whose
protocol-2 pickle is emitted by hand (`_PickleWriter`) and names only what
``torch.load(path, weights_only=True)`` accepts: dicts, OrderedDicts, lists, tuples, str,
bytes, numbers, None, and arrays as CPU tensors (``torch._utils._rebuild_tensor_v2`` over one
storage each).
"""

import collections
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from bitnet_jax.interop import torch_tensors

# NumPy dtype name -> torch storage class (the inverse of the reader's table).
_NP_TO_STORAGE = {dtype: name for name, dtype in torch_tensors.STORAGE_DTYPES.items()
                  if name != "UntypedStorage"}


class _PickleWriter:
  """Writes the protocol-2 pickle of a ``torch.save`` file by hand (no torch, no globals of
  ours): dicts, OrderedDicts, lists, tuples, str, bytes, int, float, bool, None, and arrays as
  tensors whose storages are collected in ``self.storages``."""

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[np.ndarray] = []

  def dump(self, obj) -> bytes:
    self.out.write(b"\x80\x02")  # PROTO 2
    self._save(obj)
    self.out.write(b".")  # STOP
    return self.out.getvalue()

  def _global(self, module: str, name: str):
    self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def _str(self, s: str):
    data = s.encode("utf-8", "surrogatepass")
    self.out.write(b"X" + struct.pack("<I", len(data)) + data)  # BINUNICODE

  def _int(self, i: int):
    if 0 <= i < 256:
      self.out.write(b"K" + struct.pack("<B", i))  # BININT1
    elif -2**31 <= i < 2**31:
      self.out.write(b"J" + struct.pack("<i", i))  # BININT
    else:
      data = pickle.encode_long(i)
      if len(data) > 255:
        raise ValueError(f"integer too large for the checkpoint writer: {i}")
      self.out.write(b"\x8a" + struct.pack("<B", len(data)) + data)  # LONG1

  def _tuple(self, items):
    if not items:
      self.out.write(b")")  # EMPTY_TUPLE
      return
    self.out.write(b"(")  # MARK
    for it in items:
      self._save(it)
    self.out.write(b"t")  # TUPLE

  def _items(self, mapping):
    if mapping:
      self.out.write(b"(")  # MARK
      for k, v in mapping.items():
        self._save(k)
        self._save(v)
      self.out.write(b"u")  # SETITEMS

  def _tensor(self, arr: np.ndarray):
    if arr.dtype.byteorder not in ("=", "|"):
      arr = arr.astype(arr.dtype.newbyteorder("="))  # native; see the 'byteorder' record
    dtype_name = str(arr.dtype)
    if dtype_name not in _NP_TO_STORAGE:
      raise TypeError(f"cannot write an array of dtype {arr.dtype} as a torch tensor; "
                      f"supported: {sorted(_NP_TO_STORAGE)}")
    if not arr.flags.c_contiguous:
      arr = arr.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
    key = str(len(self.storages))
    self.storages.append(arr)
    strides = tuple(s // arr.itemsize for s in arr.strides) if arr.size else (
        tuple(int(math.prod(arr.shape[i + 1:])) for i in range(arr.ndim)))
    self._global("torch._utils", "_rebuild_tensor_v2")
    self.out.write(b"(")  # MARK: args of _rebuild_tensor_v2
    self.out.write(b"(")  # MARK: persistent id
    self._str("storage")
    self._global("torch", _NP_TO_STORAGE[dtype_name])
    self._str(key)
    self._str("cpu")
    self._int(arr.size)
    self.out.write(b"t")  # TUPLE
    self.out.write(b"Q")  # BINPERSID
    self._int(0)  # storage offset
    self._tuple(tuple(int(d) for d in arr.shape))
    self._tuple(strides)
    self.out.write(b"\x89")  # requires_grad = False
    self._global("collections", "OrderedDict")  # backward hooks: OrderedDict()
    self.out.write(b")R")
    self.out.write(b"t")  # TUPLE
    self.out.write(b"R")  # REDUCE

  def _save(self, obj):
    if obj is None:
      self.out.write(b"N")
    elif obj is True or obj is False:
      self.out.write(b"\x88" if obj else b"\x89")
    elif isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
      self._int(int(obj))
    elif isinstance(obj, (float, np.floating)):
      self.out.write(b"G" + struct.pack(">d", float(obj)))  # BINFLOAT
    elif isinstance(obj, np.bool_):
      self._save(bool(obj))
    elif isinstance(obj, str):
      self._str(obj)
    elif isinstance(obj, bytes):  # protocol 2: _codecs.encode(latin1_str, 'latin1')
      self._global("_codecs", "encode")  # (torch's weights_only loader refuses builtins.bytes)
      self._tuple((obj.decode("latin1"), "latin1"))
      self.out.write(b"R")
    elif isinstance(obj, collections.OrderedDict):
      self._global("collections", "OrderedDict")
      self.out.write(b")R")  # OrderedDict()
      self._items(obj)
    elif isinstance(obj, Mapping):
      self.out.write(b"}")  # EMPTY_DICT
      self._items(obj)
    elif isinstance(obj, list):
      self.out.write(b"]")  # EMPTY_LIST
      if obj:
        self.out.write(b"(")
        for it in obj:
          self._save(it)
        self.out.write(b"e")  # APPENDS
    elif isinstance(obj, tuple):
      self._tuple(obj)
    elif isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
      self._tensor(np.asarray(obj))
    else:
      raise TypeError(f"write_checkpoint cannot write a {type(obj).__name__}; use dicts, "
                      "lists, tuples, str, bytes, numbers, None and arrays")


def write_checkpoint(path, state_dict: Mapping[str, Any], extra: Mapping[str, Any] | None = None
                     ) -> None:
  """Writes a release-layout ``.ckpt`` (a ``torch.save`` zip) without torch.

  The file holds ``{'state_dict': OrderedDict(state_dict), **extra}`` and is readable by
  `torch_reader.read_state_dict` and by ``torch.load(path, weights_only=True)``. Arrays
  anywhere become CPU tensors (one storage each, data 64-byte aligned like torch writes them).

  Args:
    path: output file; written atomically (temporary file + rename).
    state_dict: ``{key: array}``, e.g. from `release.to_torch_state_dict`.
    extra: other top-level entries (e.g. ``{'epoch': 3, 'hyper_parameters': {...}}``) made of
      dicts, lists, tuples, str, bytes, numbers, None and arrays.

  Raises:
    TypeError: a value of an unsupported type.
    ValueError: ``extra`` has a 'state_dict' key.
  """
  extra = dict(extra or {})
  if "state_dict" in extra:
    raise ValueError("extra must not contain 'state_dict'; pass it as state_dict")
  for k, v in state_dict.items():
    if not isinstance(k, str) or not (isinstance(v, np.ndarray) or hasattr(v, "__array__")):
      raise TypeError(f"state_dict must map str to arrays, found {k!r}: {type(v).__name__}")
  obj = {"state_dict": collections.OrderedDict(state_dict), **extra}
  writer = _PickleWriter()
  pkl = writer.dump(obj)

  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  prefix = "archive/"
  try:
    with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
      def record(name: str, data: bytes, align: bool = False):
        info = zipfile.ZipInfo(prefix + name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        if align:  # pad the local header so the data starts at a multiple of 64 bytes
          start = f.tell() + 30 + len(info.filename.encode()) + 4
          pad = -start % 64
          info.extra = b"FB" + struct.pack("<H", pad) + b"\0" * pad
        zf.writestr(info, data)

      record("data.pkl", pkl)
      record(".format_version", b"1")
      record(".storage_alignment", b"64")
      record("byteorder", sys.byteorder.encode())
      for i, arr in enumerate(writer.storages):
        record(f"data/{i}", arr.tobytes(), align=True)
      record("version", b"3\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
