"""Reads ``torch.save`` files (the original release's PyTorch Lightning ``.ckpt``) without torch.

A ``.ckpt`` is a ``torch.save`` zip archive::

    <archive>/data.pkl        the pickled object (protocol 2)
    <archive>/data/<key>      one raw storage per key (little-endian unless ``byteorder`` says)
    <archive>/version, <archive>/byteorder, ...

The pickle is read by the restricted unpickler (`safe_pickle.py`, whose docstring says what is
refused and why) with torch's tensor stand-ins (`torch_tensors.py`); tensors become NumPy arrays.
Storages are read lazily: `read_state_dict` only reads the storages of the state dict, not those
of the optimizer states. A pre-1.6 ``torch.save`` file (a bare pickle stream, no zip) is
refused with a hint to re-save it.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from typing import Any

import numpy as np

from bitnet_jax import errors
from bitnet_jax.interop import safe_pickle
from bitnet_jax.interop import torch_tensors
from bitnet_jax.interop.safe_pickle import CheckpointFormatError, UnsafeCheckpointError

_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error)


class _ArchiveUnpickler(safe_pickle.SafeUnpickler):
  """The restricted unpickler of an archive's data.pkl: its persistent ids are storages."""

  def __init__(self, file, archive: _Archive, strict: bool):
    super().__init__(file, torch_tensors.allowed_globals(), strict)
    self._archive = archive

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise UnsafeCheckpointError(
          f"refused persistent id {safe_pickle.short_repr(pid)}: expected ('storage', type, "
          "key, location, numel)")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, torch_tensors.StorageType):
      raise UnsafeCheckpointError(f"refused storage type {storage_type!r}")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise CheckpointFormatError(f"bad storage reference {safe_pickle.short_repr(pid)}")
    return self._archive.storage(key, torch_tensors.numpy_dtype(storage_type.dtype_name), numel)


class _Archive:
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
    self._storages: dict[str, torch_tensors.Storage] = {}

  def close(self):
    self.zip.close()

  def load_pickle(self, strict: bool):
    try:
      data = self.zip.read(self.pkl_name)
    except _READ_ERRORS as e:
      raise CheckpointFormatError(f"{self.path}: cannot read {self.pkl_name}: {e}") from e
    unpickler = _ArchiveUnpickler(io.BytesIO(data), self, strict)
    try:
      return unpickler.load()
    except (UnsafeCheckpointError, CheckpointFormatError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointFormatError(f"{self.path}: corrupt pickle in {self.pkl_name}: "
                                  f"{type(e).__name__}: {e}") from e

  def storage(self, key: str, dtype: np.dtype, numel: int) -> torch_tensors.Storage:
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
    st = torch_tensors.Storage(self.read_storage, key, dtype, numel)
    self._storages[key] = st
    return st

  def read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f"{self.prefix}data/{key}"
    try:
      buf = self.zip.read(name)
    except _READ_ERRORS as e:
      raise CheckpointFormatError(f"{self.path}: cannot read {name}: {e}") from e
    if len(buf) != numel * dtype.itemsize:
      raise CheckpointFormatError(f"{self.path}: {name} has {len(buf)} bytes, expected "
                                  f"{numel * dtype.itemsize}")
    if self.byteorder == "big" and dtype.itemsize > 1:
      unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
      buf = np.frombuffer(buf, np.uint8).reshape(-1, unit)[:, ::-1].tobytes()
    return np.frombuffer(buf, dtype=dtype, count=numel)


def _open(path) -> _Archive:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise errors.CheckpointError(f"checkpoint not found: {path}")
  if os.path.isdir(path):
    raise CheckpointFormatError(f"{path} is a directory, expected a .ckpt file")
  return _Archive(path)


def load_checkpoint(path, *, strict: bool = True) -> Any:
  """Loads a whole ``torch.save`` file safely, tensors as NumPy arrays.

  Args:
    path: the ``.ckpt`` / ``.pt`` file.
    strict: see `safe_pickle`; with False, calls to globals outside the allow-list become
      inert `UnknownObject` records instead of raising.

  Returns:
    The unpickled object with containers as dicts/lists/tuples, tensors as NumPy arrays
    (bfloat16 as ``ml_dtypes.bfloat16``), ``argparse.Namespace``/``AttributeDict`` as
    `HParams` dicts.

  Raises:
    CheckpointError: no such file (a FileNotFoundError).
    CheckpointFormatError: not a torch.save zip, or corrupt.
    UnsafeCheckpointError: the pickle calls a global outside the allow-list (strict).
  """
  archive = _open(path)
  try:
    return safe_pickle.materialize(archive.load_pickle(strict))
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
    CheckpointError: no such file (a FileNotFoundError).
    CheckpointFormatError: not a torch.save zip, corrupt, no state dict in it, or a state-dict
      entry that is not a tensor.
    UnsafeCheckpointError: refused global (see `safe_pickle`), also inside the state dict with
      ``strict=False``.
  """
  archive = _open(path)
  try:
    obj = archive.load_pickle(strict)
    if isinstance(obj, dict) and "state_dict" in obj:
      sd = obj["state_dict"]
      if not isinstance(sd, dict):
        raise CheckpointFormatError(
            f"{path}: 'state_dict' must be a dict of tensors, found {type(sd).__name__}")
    elif isinstance(obj, dict) and obj and all(
        isinstance(v, torch_tensors.TensorRef) for v in obj.values()):
      sd = obj  # a bare state dict saved with torch.save(model.state_dict())
    else:
      keys = list(obj)[:20] if isinstance(obj, dict) else None
      raise CheckpointFormatError(
          f"{path}: no 'state_dict' entry; expected a Lightning checkpoint (a dict with "
          f"'state_dict') or a dict of tensors, found {type(obj).__name__}"
          + (f" with keys {keys}" if keys is not None else ""))
    bad = {str(k): repr(v) for k, v in sd.items() if not isinstance(v, torch_tensors.TensorRef)}
    if bad:
      error = CheckpointFormatError
      if any(isinstance(v, (safe_pickle.UnknownGlobal, type)) for v in sd.values()):
        error = UnsafeCheckpointError  # refused objects must never pass as weights
      raise error(f"{path}: state dict entries that are not tensors: "
                  f"{safe_pickle.short_repr(bad, 500)}")
    return {str(k): v.materialize() for k, v in sd.items()}
  finally:
    archive.close()
