"""MNIST and Fashion-MNIST in their distributed form: IDX files.

`{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`, gzipped or not, directly in `data_dir`
(Debian's dataset-fashion-mnist package installs them in /usr/share/datasets/fashion-mnist).
They are small, so they are decoded into memory once (`registry.py` caches them, pads the 28x28
images to 32x32 and computes mean/std on the original pixels).
"""

import gzip
import os

import numpy as np

from bitnet_jax import errors
from bitnet_jax.data import source

NAMES = ("fashion_mnist", "mnist")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 1)  # as the pipeline yields them: 28x28, zero-padded by 2 pixels per side

_PREFIX = {"train": "train", "test": "t10k"}
_KINDS = ("images-idx3", "labels-idx1")


def local_files() -> list[str]:
  """The file names that make up the distributed form (for messages)."""
  return [f"{_PREFIX[s]}-{k}-ubyte[.gz]" for s in source.SPLITS for k in _KINDS]


def find(name: str, data_dir: str) -> str | None:
  """`data_dir` if the existing folder `data_dir` holds the IDX files, None if it holds none.

  Raises:
    errors.DataNotFound: if only some of the files are there (naming the missing ones).
  """
  found = {k: p for s in source.SPLITS for k, p in _paths(data_dir, s).items()}
  if all(p is None for p in found.values()):
    return None
  missing = [k for k, p in found.items() if p is None]
  if missing:
    raise errors.DataNotFound(f"{data_dir} holds some {name} IDX files but is missing "
                              f'{[k + "[.gz]" for k in missing]}.')
  return data_dir


def read(folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Both splits from the IDX files in `folder` (see `find`).

  Returns:
    {split: (images uint8 (N, 28, 28, 1), labels int32 (N,))}, not padded.
  """
  splits = {}
  for split in source.SPLITS:
    images_path, labels_path = _paths(folder, split).values()
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
      raise errors.DataError(f"{images_path}: expected images (N, 28, 28), found "
                             f"{images.shape}.")
    if labels.ndim != 1 or len(labels) != len(images):
      raise errors.DataError(f"{labels_path}: expected {len(images)} labels (N,) to match "
                             f"{images_path}, found shape {labels.shape}.")
    labels = labels.astype(np.int32)
    source.check_labels(labels, NUM_CLASSES, labels_path)
    splits[split] = (images[..., None], labels)  # (N, 28, 28, 1)
  return splits


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (MNIST family), gzipped or not.

  Args:
    path: file path; gzip is detected from its first bytes, not its name.

  Returns:
    A uint8 array with the shape stored in the header.

  Raises:
    errors.DataError (a ValueError): on a bad magic number, a non-uint8 type, a corrupt gzip or
      a size that does not match.
  """
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  try:
    with (gzip.open if gzipped else open)(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise errors.DataError(f"Cannot read IDX file {path} (corrupt or truncated gzip): {e}") from e
  if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
    raise errors.DataError(f"{path} is not an IDX file of unsigned bytes: magic "
                           f"{raw[:4].hex()!r}, expected '000008' followed by the number of "
                           "dimensions (01 or 03).")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise errors.DataError(f"{path}: truncated IDX header.")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  expected = int(np.prod(shape))
  if len(raw) - header != expected:
    raise errors.DataError(f"{path}: IDX header says shape {shape} ({expected} bytes of data) "
                           f"but the file holds {len(raw) - header} bytes (truncated or "
                           "corrupt).")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def pad_28_to_32(images: np.ndarray) -> np.ndarray:
  """Zero-pads uint8 images (N, 28, 28, C) by 2 pixels per side to (N, 32, 32, C)."""
  return np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))


def _paths(folder: str, split: str) -> dict[str, str | None]:
  """{file name: path of the IDX file (gzipped or not), None if absent} for `split`."""
  out = {}
  for kind in _KINDS:
    name = f"{_PREFIX[split]}-{kind}-ubyte"
    base = os.path.join(folder, name)
    out[name] = next((p for p in (base + ".gz", base) if os.path.isfile(p)), None)
  return out
