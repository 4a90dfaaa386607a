"""CIFAR-10 / CIFAR-100 in their distributed form: the python pickles.

`cifar-10-batches-py/{data_batch_1..5, test_batch}` and `cifar-100-python/{train, test}` (fine
labels); `data_dir` may be that folder or its parent. They are small, so they are decoded into
memory once (`registry.py` caches them). The pickles are read with the project's one restricted
unpickler (`interop.safe_pickle.load_pickle`), which refuses anything but plain data.
"""

import os
import pickle

import numpy as np

from bitnet_jax import errors
from bitnet_jax.interop import safe_pickle
from bitnet_jax.data import source

NAMES = ("cifar10", "cifar100")
MEAN = (0.4914, 0.4822, 0.4465)  # the release's normalisation, for both datasets
STD = (0.2471, 0.2435, 0.2616)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
IMAGE_SHAPE = (32, 32, 3)

_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_FILES = {"cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
          "cifar100": {"train": ["train"], "test": ["test"]}}
_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}


def local_files(name: str) -> list[str]:
  """The file names that make up the distributed form of `name` (for messages)."""
  return [f"{_FOLDER[name]}/{f}" for fs in _FILES[name].values() for f in fs]


def find(name: str, data_dir: str) -> str | None:
  """The folder in or below the existing folder `data_dir` holding `name`'s pickles, or None.

  Raises:
    errors.DataNotFound: if only some of the files are there (naming the missing ones).
  """
  folder, files = _FOLDER[name], sum(_FILES[name].values(), [])
  if os.path.basename(data_dir) == folder:
    root = data_dir
  elif os.path.isdir(os.path.join(data_dir, folder)):
    root = os.path.join(data_dir, folder)
  elif any(os.path.isfile(os.path.join(data_dir, f)) for f in files):
    root = data_dir
  else:
    return None
  missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
  if missing:
    raise errors.DataNotFound(f"{root} is missing {name} files {missing}; expected {files} "
                              f"(the extracted python version of {name}).")
  return root


def read(name: str, folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Both splits of `name` from `folder` (see `find`).

  Returns:
    {split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}.
  """
  splits = {}
  for split, files in _FILES[name].items():
    parts = [read_pickle(os.path.join(folder, f), _LABEL_KEY[name], NUM_CLASSES[name])
             for f in files]
    splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  return splits


def read_pickle(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR python batch: images uint8 (N, 32, 32, 3), labels int32 (N,).

  Raises:
    errors.DataError: if the file is truncated, not a CIFAR pickle, or asks the unpickler for
      anything but plain data (nothing is executed).
  """
  try:
    with open(path, "rb") as f:
      batch = safe_pickle.load_pickle(f, encoding="bytes")  # the one safe unpickler
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
    raise errors.DataError(f"Cannot read CIFAR batch {path} (truncated or not a CIFAR python "
                           f"pickle): {e}") from e
  if not isinstance(batch, dict):
    raise errors.DataError(f"{path}: expected a dict, found {type(batch).__name__}.")
  batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
  missing = [k for k in ("data", label_key) if k not in batch]
  if missing:
    raise errors.DataError(f"{path}: CIFAR batch is missing keys {missing} (found "
                           f"{sorted(batch)}).")
  data = np.asarray(batch["data"])
  labels = np.asarray(batch[label_key])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise errors.DataError(f'{path}: "data" must be uint8 (N, 3072), found {data.dtype} '
                           f"{data.shape}.")
  if labels.shape != (len(data),):
    raise errors.DataError(f"{path}: {len(data)} images but {labels.size} labels.")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3), channel-last
  labels = labels.astype(np.int32)
  source.check_labels(labels, num_classes, path)
  return np.ascontiguousarray(images), labels
