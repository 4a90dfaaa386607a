"""Dataset sources: where images and labels come from, and what they look like.

Every dataset is turned into one *source* per split ('train', 'test'): an object with
`len(source)`, `source[i] -> {'image', 'label'}` (grain's random-access protocol) and
`source.read(ids) -> (images uint8 (b, H, W, C), labels int32 (b,))`, a vectorised read that the
input pipeline (`input_pipeline.py`) calls once per batch. Its `DatasetInfo` says the number of
classes, the image shape, split sizes and the normalisation statistics.

`config.dataset` selects the dataset; `config.data_dir` where it is read from:

* `cifar10`, `cifar100`, `fashion_mnist`, `mnist`:
  - **local files** when `data_dir` holds the dataset in its distributed form:
    CIFAR python pickles (`cifar-10-batches-py/{data_batch_1..5, test_batch}`,
    `cifar-100-python/{train, test}`; `data_dir` may be that folder or its parent) or the
    MNIST-family IDX files (`{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`, gzipped or
    not, directly in `data_dir`). They are small, so they are decoded into memory once.
    If only some of those files are there, that is an error (naming the missing ones), not a
    silent switch to TFDS.
  - **TFDS** otherwise, with `data_dir` as the TFDS data dir ('' or None: TFDS's default,
    $TFDS_DATA_DIR or ~/tensorflow_datasets), in any folder: the dataset must be prepared
    there as ArrayRecord, the TFDS format with random access, once, by
    `python -m bitnet_jax.prepare <name> --data_dir <dir>` (`bitnet_jax/prepare.py`: it
    downloads and runs TFDS's builder, which needs TensorFlow, in a child process). Reading
    opens the array_record files (`builder.as_data_source`) and decodes records per batch:
    nothing is loaded up front, nothing is downloaded or prepared, and TensorFlow is never
    imported. A missing preparation, or one in TFRecord (what `tfds.load` writes), is an error
    that names what was found and the command to run.
* `tiny_imagenet`: the extracted `tiny-imagenet-200/` folder (or its parent). The 110k JPEGs
  are listed at start-up (cheap) and decoded lazily, per record, with PIL; grayscale JPEGs are
  converted to RGB. The 'test' split is the labelled `val/` folder.
* `npz`: `data_dir` is the path of one .npz file with `x_train`, `y_train`, `x_test`, `y_test`
  (uint8 images (N, H, W) or (N, H, W, C), C in {1, 3}; non-negative integer labels).
  `num_classes` = largest label + 1. Images are used at their stored size.
* `synthetic`: seeded, class-dependent images (each class is a noisy copy of its own random
  low-frequency pattern, so a model can learn it); shape and size from the `synthetic_*`
  config fields (see `get_dataset_info`). The data do not depend on `config.seed`.

The 28x28 MNIST-family images are zero-padded to 32x32 (2 pixels each side, on uint8) and keep
one channel. Mean/std are the release's values for CIFAR-10/100 and Tiny-ImageNet; for the
other datasets they are computed, exactly (from per-channel byte histograms), on the training
split's original pixels, i.e. *before* the MNIST padding, so they match the usual published
values (MNIST 0.1307/0.3081, Fashion-MNIST 0.2860/0.3530).
"""

import dataclasses
import functools
import gzip
import json
import os
import pickle
import shlex
import zipfile
from typing import Any, Protocol, Sequence

import numpy as np

from bitnet_jax import errors
from bitnet_jax.interop import safe_pickle

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mnist", "tiny_imagenet", "npz",
            "synthetic")
SPLITS = ("train", "test")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2302, 0.2265, 0.2262)

_MNIST_FAMILY = ("mnist", "fashion_mnist")
_TFDS_NAMES = ("cifar10", "cifar100", "fashion_mnist", "mnist")
_CIFAR_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_FILES = {"cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)],
                            "test": ["test_batch"]},
                "cifar100": {"train": ["train"], "test": ["test"]}}
_CIFAR_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10,
                "tiny_imagenet": 200}
_IMAGE_SHAPE = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "mnist": (32, 32, 1),
                "fashion_mnist": (32, 32, 1), "tiny_imagenet": (64, 64, 3)}
_FIXED_STATS = {"cifar10": (CIFAR_MEAN, CIFAR_STD), "cifar100": (CIFAR_MEAN, CIFAR_STD),
                "tiny_imagenet": (TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)}

# Defaults of the optional config fields read here.
SYNTHETIC_DEFAULTS = {
    "synthetic_num_train": 1024,            # training examples
    "synthetic_num_test": 256,              # test examples
    "synthetic_num_classes": 10,            # classes
    "synthetic_image_shape": (32, 32, 3),   # (H, W, C), C in {1, 3}
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the trainer need to know about a dataset.

  Attributes:
    name: `config.dataset`.
    num_classes: number of classes; labels are in [0, num_classes).
    image_shape: (H, W, C) of the images the pipeline yields (after MNIST padding).
    num_train: examples in the whole training split.
    num_test: examples in the whole test split.
    mean: per-channel mean, shape (C,), on the 0..1 scale.
    std: per-channel standard deviation, shape (C,), on the 0..1 scale.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def num_examples(self, split: str) -> int:
    """Size of the whole `split` ('train' or 'test')."""
    _check_split(split)
    return self.num_train if split == "train" else self.num_test


class Source(Protocol):
  """A random-access split: what the input pipeline reads."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...

  def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns images uint8 (b, H, W, C) and labels int32 (b,) of examples `ids` (b,)."""
    ...


# ------------------------------------------------------------------------------------------
# Sources.


class ArraySource:
  """A split held in memory as two arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images  # (N, H, W, C) uint8
    self.labels = labels  # (N,) int32

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}

  def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[ids], self.labels[ids]


class TfdsSource:
  """A TFDS array_record data source, read and decoded record by record."""

  def __init__(self, data_source: Sequence[dict[str, Any]], name: str, split: str):
    self._source = data_source
    self._name = name
    self._split = split
    self._num_classes = _NUM_CLASSES[name]
    self._pad = name in _MNIST_FAMILY

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    images, labels = self.read(np.asarray([index]))
    return {"image": images[0], "label": labels[0]}

  def read_raw(self, ids: np.ndarray) -> np.ndarray:
    """Returns the stored images (b, H, W, C) of `ids`, before any padding."""
    return np.stack([self._source[int(i)]["image"] for i in ids])

  def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    records = [self._source[int(i)] for i in ids]
    images = np.stack([r["image"] for r in records])  # (b, H, W, C)
    labels = np.asarray([r["label"] for r in records], np.int32)  # (b,)
    where = f"TFDS {self._name!r} split {self._split!r}"
    _check_images(images, where, channels=_IMAGE_SHAPE[self._name][-1])
    _check_labels(labels, self._num_classes, where)
    if self._pad:
      images = pad_28_to_32(images)
    return images, labels


class ImageFileSource:
  """Image files decoded with PIL when read (Tiny-ImageNet)."""

  def __init__(self, paths: Sequence[str], labels: np.ndarray, image_shape: tuple[int, ...]):
    self.paths = list(paths)
    self.labels = labels  # (N,) int32
    self.image_shape = tuple(image_shape)  # (H, W, 3)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self._decode(self.paths[index]), "label": self.labels[index]}

  def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(ids),) + self.image_shape, np.uint8)  # (b, H, W, 3)
    for row, i in enumerate(ids):
      images[row] = self._decode(self.paths[i])
    return images, self.labels[ids]

  def _decode(self, path: str) -> np.ndarray:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    try:
      with Image.open(path) as img:
        image = np.asarray(img.convert("RGB"))  # grayscale JPEGs -> 3 equal channels
    except (OSError, ValueError) as e:
      raise errors.DataError(f"Cannot decode image {path}: {e}") from e
    if image.shape != self.image_shape:
      raise errors.DataError(f"Image {path} has shape {image.shape}, expected {self.image_shape}.")
    return image


# ------------------------------------------------------------------------------------------
# Public entry points.


def get_dataset_info(config) -> DatasetInfo:
  """Describes `config.dataset` without decoding images that are not already in memory.

  Local CIFAR/IDX/npz/synthetic data are loaded (and cached for this process, so the
  iterators reuse them); TFDS and Tiny-ImageNet only open or list files, except that the
  MNIST family through TFDS reads its training split once to compute mean/std.

  Args:
    config: reads `dataset`, `data_dir` and, for 'synthetic', `synthetic_num_train`,
      `synthetic_num_test`, `synthetic_num_classes`, `synthetic_image_shape`.

  Returns:
    The DatasetInfo.
  """
  name = _check_name(config)
  if name in _TFDS_NAMES and _local_dir(config) is None:
    train, test = (get_source(config, s) for s in SPLITS)
    if name in _FIXED_STATS:
      mean, std = _FIXED_STATS[name]
    else:
      mean, std = _stats_in_chunks(train)
    return DatasetInfo(name, _NUM_CLASSES[name], _IMAGE_SHAPE[name], len(train), len(test),
                       mean, std)
  if name == "tiny_imagenet":
    train, test = (get_source(config, s) for s in SPLITS)
    return DatasetInfo(name, 200, train.image_shape, len(train), len(test),
                       TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)
  return _load_in_memory(*_memory_key(config)).info


def get_source(config, split: str) -> Source:
  """Opens split `split` ('train' or 'test') of `config.dataset` for random access.

  Args:
    config: as for `get_dataset_info`.
    split: 'train' or 'test' (Tiny-ImageNet: 'test' is the labelled val/ folder).

  Returns:
    A `Source` whose `read` yields uint8 (b, H, W, C) images and int32 (b,) labels.
  """
  name = _check_name(config)
  _check_split(split)
  if name in _TFDS_NAMES and _local_dir(config) is None:
    return _open_tfds(name, split, config.get("data_dir") or None)
  if name == "tiny_imagenet":
    return _tiny_imagenet_sources(_tiny_imagenet_root(config))[split]
  return _load_in_memory(*_memory_key(config)).sources[split]


def pad_28_to_32(images: np.ndarray) -> np.ndarray:
  """Zero-pads uint8 images (N, 28, 28, C) by 2 pixels per side to (N, 32, 32, C)."""
  return np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Exact per-channel mean and std of uint8 images (N, H, W, C), on the 0..1 scale."""
  return _stats_from_histograms(_histograms(images))


# ------------------------------------------------------------------------------------------
# Config checks.


def _check_name(config) -> str:
  name = config.get("dataset", None)
  if name not in DATASETS:
    raise errors.ConfigError(f"Unknown dataset {name!r}; valid config.dataset values: "
                     f'{", ".join(DATASETS)}.')
  return name


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")


def _check_images(images: np.ndarray, where: str, channels: int | None = None) -> None:
  """Checks uint8 (N, H, W, C) with C in {1, 3} (or == `channels`)."""
  if images.dtype != np.uint8:
    raise errors.DataError(f"{where}: images must be uint8, found {images.dtype}.")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.DataError(f"{where}: images must have shape (N, H, W) or (N, H, W, C) with C in "
                     f"{{1, 3}}, found {images.shape}.")
  if channels is not None and images.shape[-1] != channels:
    raise errors.DataError(f"{where}: expected {channels} channel(s), found {images.shape}.")


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise errors.DataError(f"{where}: labels must be in [0, {num_classes}), found "
                     f"[{labels.min()}, {labels.max()}].")


def _check_exists(path: str, what: str) -> None:
  if not os.path.exists(path):
    raise errors.DataNotFound(f"{what} not found: {path}")


# ------------------------------------------------------------------------------------------
# Datasets held in memory (local CIFAR / IDX files, npz, synthetic), cached per process.


@dataclasses.dataclass(frozen=True)
class _InMemory:
  info: DatasetInfo
  sources: dict[str, ArraySource]


def _memory_key(config) -> tuple:
  """The hashable part of `config` that determines an in-memory dataset."""
  name = _check_name(config)
  if name == "synthetic":
    fields = tuple(config.get(k, v) for k, v in SYNTHETIC_DEFAULTS.items())
    return name, None, (fields[0], fields[1], fields[2], tuple(fields[3]))
  if name == "npz":
    data_dir = config.get("data_dir", None)
    if not data_dir:
      raise errors.ConfigError("config.dataset='npz' needs config.data_dir = path of a .npz file with "
                       "x_train, y_train, x_test, y_test.")
    return name, os.path.abspath(os.path.expanduser(data_dir)), None
  return name, _local_dir(config), None


@functools.lru_cache(maxsize=2)
def _load_in_memory(name: str, path: str | None, synthetic: tuple | None) -> _InMemory:
  """Loads both splits; cached so that info and the iterators share one copy."""
  if name == "synthetic":
    splits, num_classes = _make_synthetic(*synthetic)
  elif name == "npz":
    splits, num_classes = _read_npz(path)
  elif name in _MNIST_FAMILY:
    splits, num_classes = _read_idx_dir(path), 10
  else:
    splits, num_classes = _read_cifar_dir(name, path), _NUM_CLASSES[name]
  for split, (images, labels) in splits.items():
    where = f"{name} {split} split ({path})" if path else f"{name} {split} split"
    _check_images(images, where)
    _check_labels(labels, num_classes, where)
  if name in _FIXED_STATS:
    mean, std = _FIXED_STATS[name]
  else:
    mean, std = channel_stats(splits["train"][0])
  if name in _MNIST_FAMILY:
    splits = {s: (pad_28_to_32(x), y) for s, (x, y) in splits.items()}
  train, test = splits["train"], splits["test"]
  if train[0].shape[1:] != test[0].shape[1:]:
    raise errors.DataError(f"{name}: train images {train[0].shape[1:]} and test images "
                     f"{test[0].shape[1:]} differ in shape ({path}).")
  info = DatasetInfo(name, num_classes, tuple(train[0].shape[1:]), len(train[1]), len(test[1]),
                     mean, std)
  return _InMemory(info, {s: ArraySource(x, y) for s, (x, y) in splits.items()})


def _make_synthetic(num_train: int, num_test: int, num_classes: int,
                    image_shape: tuple[int, ...]) -> tuple[dict, int]:
  """Class-dependent random images: class prototype (4x4 pattern, upsampled) + noise."""
  if len(image_shape) != 3 or image_shape[-1] not in (1, 3) or min(image_shape) < 1:
    raise errors.ConfigError(f"synthetic_image_shape must be (H, W, C) with C in {{1, 3}}, found "
                     f"{image_shape}.")
  if num_train < 1 or num_test < 1 or num_classes < 2:
    raise errors.ConfigError("synthetic_num_train/num_test must be >= 1 and synthetic_num_classes "
                     f">= 2, found {num_train}, {num_test}, {num_classes}.")
  h, w, c = image_shape
  rng = np.random.default_rng(0)
  patterns = rng.integers(32, 224, (num_classes, 4, 4, c)).astype(np.int16)
  rows, cols = np.arange(h) * 4 // h, np.arange(w) * 4 // w
  prototypes = patterns[:, rows][:, :, cols]  # (classes, H, W, C)
  splits = {}
  for seed, (split, n) in enumerate((("train", num_train), ("test", num_test)), start=1):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)  # balanced
    images = np.empty((n, h, w, c), np.uint8)
    for start in range(0, n, 4096):  # chunks bound the int16 noise memory
      stop = min(n, start + 4096)
      noise = rng.integers(-48, 49, (stop - start, h, w, c), dtype=np.int16)
      images[start:stop] = np.clip(prototypes[labels[start:stop]] + noise, 0, 255)
    splits[split] = (images, labels)
  return splits, num_classes


def _read_npz(path: str) -> tuple[dict, int]:
  """Reads x_train, y_train, x_test, y_test from one .npz file."""
  _check_exists(path, "npz file (config.data_dir)")
  keys = ("x_train", "y_train", "x_test", "y_test")
  try:
    with np.load(path, allow_pickle=False) as npz:
      if not isinstance(npz, np.lib.npyio.NpzFile):
        raise errors.DataError("a single .npy array, not an .npz archive")
      missing = [k for k in keys if k not in npz.files]
      if missing:
        raise errors.DataError(f"missing arrays {missing} (found {npz.files}); expected {list(keys)}")
      arrays = {k: npz[k] for k in keys}
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise errors.DataError(f"Cannot read npz file {path}: {e}.") from e
  splits = {}
  for split in SPLITS:
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim == 3:
      x = x[..., None]  # (N, H, W) -> (N, H, W, 1)
    _check_images(x, f"{path} x_{split}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      raise errors.DataError(f"{path}: y_{split} must be a 1-D integer array, found shape {y.shape} "
                       f"dtype {y.dtype}.")
    if len(y) != len(x):
      raise errors.DataError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} "
                       "labels.")
    if y.size and y.min() < 0:
      raise errors.DataError(f"{path}: y_{split} labels must be >= 0, found {y.min()}.")
    splits[split] = (x, y.astype(np.int32))
  num_classes = int(max(y.max(initial=0) for _, y in splits.values())) + 1
  return splits, num_classes


# ------------------------------------------------------------------------------------------
# Local files in their distributed form: detection.

def _local_files(name: str) -> list[str]:
  """The file names that make up the distributed form of `name` (for messages)."""
  if name in _CIFAR_FOLDER:
    return [f"{_CIFAR_FOLDER[name]}/{f}" for fs in _CIFAR_FILES[name].values() for f in fs]
  return [f"{_IDX_PREFIX[s]}-{k}-ubyte[.gz]" for s in SPLITS
          for k in ("images-idx3", "labels-idx1")]


def _local_dir(config) -> str | None:
  """The folder holding local files of a CIFAR/MNIST-family dataset, or None (-> TFDS).

  Raises:
    FileNotFoundError: if `data_dir` does not exist, or holds only part of the files.
  """
  name = _check_name(config)
  data_dir = config.get("data_dir", None)
  if not data_dir:
    return None
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(data_dir):
    raise errors.DataNotFound(
        f"config.data_dir does not exist or is not a folder: {data_dir}. Point it at the "
        f'local files of {name!r} ({", ".join(_local_files(name))}) or at a TFDS data dir '
        "(create it first for a TFDS download), or leave it empty for the default TFDS dir.")
  if name in _CIFAR_FOLDER:
    folder, files = _CIFAR_FOLDER[name], sum(_CIFAR_FILES[name].values(), [])
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
  found = {k: p for s in SPLITS for k, p in _idx_paths(data_dir, s).items()}
  if all(p is None for p in found.values()):
    return None
  missing = [k for k, p in found.items() if p is None]
  if missing:
    raise errors.DataNotFound(f"{data_dir} holds some {name} IDX files but is missing "
                            f'{[k + "[.gz]" for k in missing]}.')
  return data_dir


def _idx_paths(folder: str, split: str) -> dict[str, str | None]:
  """{file name: path of the IDX file (gzipped or not), None if absent} for `split`."""
  out = {}
  for kind in ("images-idx3", "labels-idx1"):
    name = f"{_IDX_PREFIX[split]}-{kind}-ubyte"
    base = os.path.join(folder, name)
    out[name] = next((p for p in (base + ".gz", base) if os.path.isfile(p)), None)
  return out


# ------------------------------------------------------------------------------------------
# Local files: readers.


def _read_cifar_pickle(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
  """Reads one CIFAR python batch: images uint8 (N, 32, 32, 3), labels int32 (N,)."""
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
    raise errors.DataError(f"{path}: CIFAR batch is missing keys {missing} (found {sorted(batch)}).")
  data = np.asarray(batch["data"])
  labels = np.asarray(batch[label_key])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise errors.DataError(f'{path}: "data" must be uint8 (N, 3072), found {data.dtype} '
                     f"{data.shape}.")
  if labels.shape != (len(data),):
    raise errors.DataError(f"{path}: {len(data)} images but {labels.size} labels.")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3), channel-last
  labels = labels.astype(np.int32)
  _check_labels(labels, num_classes, path)
  return np.ascontiguousarray(images), labels


def _read_cifar_dir(name: str, folder: str) -> dict:
  splits = {}
  for split, files in _CIFAR_FILES[name].items():
    parts = [_read_cifar_pickle(os.path.join(folder, f), _CIFAR_LABEL_KEY[name],
                                _NUM_CLASSES[name]) for f in files]
    splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  return splits


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (MNIST family), gzipped or not.

  Args:
    path: file path; gzip is detected from its first bytes, not its name.

  Returns:
    A uint8 array with the shape stored in the header.

  Raises:
    ValueError: on a bad magic number, a non-uint8 type or a size that does not match.
  """
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  try:
    with (gzip.open if gzipped else open)(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise errors.DataError(f"Cannot read IDX file {path} (corrupt or truncated gzip): {e}") from e
  if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
    raise errors.DataError(f"{path} is not an IDX file of unsigned bytes: magic {raw[:4].hex()!r}, "
                     "expected '000008' followed by the number of dimensions (01 or 03).")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise errors.DataError(f"{path}: truncated IDX header.")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  expected = int(np.prod(shape))
  if len(raw) - header != expected:
    raise errors.DataError(f"{path}: IDX header says shape {shape} ({expected} bytes of data) but "
                     f"the file holds {len(raw) - header} bytes (truncated or corrupt).")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _read_idx_dir(folder: str) -> dict:
  splits = {}
  for split in SPLITS:
    images_path, labels_path = _idx_paths(folder, split).values()
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
      raise errors.DataError(f"{images_path}: expected images (N, 28, 28), found {images.shape}.")
    if labels.ndim != 1 or len(labels) != len(images):
      raise errors.DataError(f"{labels_path}: expected {len(images)} labels (N,) to match "
                       f"{images_path}, found shape {labels.shape}.")
    labels = labels.astype(np.int32)
    _check_labels(labels, 10, labels_path)
    splits[split] = (images[..., None], labels)  # (N, 28, 28, 1)
  return splits


def _tiny_imagenet_root(config) -> str:
  data_dir = config.get("data_dir", None)
  if not data_dir:
    raise errors.ConfigError("config.dataset='tiny_imagenet' needs config.data_dir = the extracted "
                     "tiny-imagenet-200/ folder (or its parent).")
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  for root in (data_dir, os.path.join(data_dir, "tiny-imagenet-200")):
    if os.path.isfile(os.path.join(root, "wnids.txt")):
      return root
  raise errors.DataNotFound(f"No Tiny-ImageNet folder at {data_dir}: expected wnids.txt, train/ "
                          "and val/ in it or in its tiny-imagenet-200/ subfolder.")


@functools.lru_cache(maxsize=2)
def _tiny_imagenet_sources(root: str) -> dict[str, ImageFileSource]:
  """Lists Tiny-ImageNet's files: classes in wnids.txt order; 'test' = val/."""
  with open(os.path.join(root, "wnids.txt")) as f:
    wnids = [line.strip() for line in f if line.strip()]
  if len(wnids) != len(set(wnids)):
    raise errors.DataError(f"{root}/wnids.txt lists a class twice.")
  index = {wnid: i for i, wnid in enumerate(wnids)}
  paths, labels = [], []
  for wnid in wnids:
    folder = os.path.join(root, "train", wnid, "images")
    _check_exists(folder, f"Tiny-ImageNet training folder of class {wnid}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpeg", ".jpg")))
    if not names:
      raise errors.DataNotFound(f"No JPEG files in {folder}.")
    paths += [os.path.join(folder, n) for n in names]
    labels += [index[wnid]] * len(names)
  train = ImageFileSource(paths, np.asarray(labels, np.int32), (64, 64, 3))

  annotations = os.path.join(root, "val", "val_annotations.txt")
  _check_exists(annotations, "Tiny-ImageNet val/val_annotations.txt")
  paths, labels = [], []
  with open(annotations) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) < 2 or fields[1] not in index:
        raise errors.DataError(f'{annotations} line {line_number}: expected "<file>\\t<wnid>\\t..." '
                         f"with a wnid from wnids.txt, found {line.strip()!r}.")
      paths.append(os.path.join(root, "val", "images", fields[0]))
      labels.append(index[fields[1]])
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise errors.DataNotFound(f"{len(missing)} images listed in {annotations} are missing, e.g. "
                            f"{missing[0]}.")
  test = ImageFileSource(paths, np.asarray(labels, np.int32), (64, 64, 3))
  return {"train": train, "test": test}


# ------------------------------------------------------------------------------------------
# TFDS.


TFDS_NAMES = _TFDS_NAMES  # the datasets read through TFDS (and prepared by bitnet_jax.prepare)
_TFDS_FORMAT = "array_record"  # the one TFDS file format with random access that we read


def _tfds_builder(name: str, data_dir: str | None):
  """TFDS's builder of `name` in `data_dir` (None: TFDS's default).

  Its file format is the one of the preparation found there (dataset_info.json), if any.
  Building it neither downloads, prepares nor imports TensorFlow.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.builder(name, data_dir=data_dir)


def tfds_prepared(name: str, data_dir: str | None) -> tuple[str, tuple[str, ...]]:
  """Where TFDS keeps `name` in `data_dir`, and the file formats prepared there.

  Args:
    name: one of `TFDS_NAMES`.
    data_dir: the TFDS data dir; '' or None: TFDS's default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).

  Returns:
    (the version folder `<data_dir>/<name>/<version>`, the file formats its dataset_info.json
    lists, e.g. ('array_record',) or ('tfrecord',); () when nothing is prepared there).
  """
  builder = _tfds_builder(name, data_dir or None)
  info_file = builder.data_path / "dataset_info.json"  # an etils epath: local or gs://
  if not info_file.exists():  # no finished preparation (TFDS renames the folder at the end)
    return str(builder.data_path), ()
  info = json.loads(info_file.read_text())
  formats = [info.get("fileFormat") or "tfrecord"] + list(info.get("alternativeFileFormats", []))
  return str(builder.data_path), tuple(dict.fromkeys(formats))


def _open_tfds(name: str, split: str, data_dir: str | None) -> TfdsSource:
  """Opens split `split` of `name`, prepared as ArrayRecord in `data_dir`; never prepares it.

  Raises:
    FileNotFoundError: if `name` is not prepared as ArrayRecord there; the message says what
      was found and the command that prepares it.
  """
  builder = _tfds_builder(name, data_dir)
  try:
    source = builder.as_data_source(split=split, file_format=_TFDS_FORMAT)
  except Exception as e:  # pylint: disable=broad-except; TFDS raises many kinds here
    path, formats = tfds_prepared(name, data_dir)
    root = shlex.quote(str(builder.data_dir_root))  # as typed in a shell
    if not formats:
      raise errors.DataNotFound(
          f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root} (no "
          f"{path}/dataset_info.json). "
          f"Prepare it once (this downloads it, and needs TensorFlow in that step only):\n"
          f"  python -m bitnet_jax.prepare {name} --data_dir {root}\n"
          "Or download the original files and set config.data_dir to the folder holding them: "
          f'{", ".join(_local_files(name))}.') from e
    if _TFDS_FORMAT not in formats:
      raise errors.DataNotFound(
          f"{path} holds a {'/'.join(formats)} preparation of TFDS dataset {name!r} (e.g. left "
          f"by tfds.load), not ArrayRecord, the format read here. Replace it:\n"
          f"  python -m bitnet_jax.prepare {name} --data_dir {root} --overwrite") from e
    raise errors.DataNotFound(f"TFDS cannot open split {split!r} of the ArrayRecord files of "
                            f"{name!r} in {path}: {type(e).__name__}: {e}") from e
  return TfdsSource(source, name, split)


def _histograms(images: np.ndarray) -> np.ndarray:
  """Per-channel byte histograms (C, 256) of uint8 images (N, H, W, C)."""
  return np.stack([np.bincount(images[..., c].ravel(), minlength=256)
                   for c in range(images.shape[-1])])


def _stats_from_histograms(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  values = np.arange(256, dtype=np.float64) / 255.0
  count = hist.sum(axis=1)  # (C,)
  mean = hist @ values / count
  var = hist @ values**2 / count - mean**2
  return (tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(np.maximum(var, 0))))


def _stats_in_chunks(source: TfdsSource, chunk: int = 4096):
  """Mean/std of a TFDS training split, read in chunks, before any padding."""
  hist = 0
  for start in range(0, len(source), chunk):
    hist = hist + _histograms(source.read_raw(np.arange(start, min(len(source), start + chunk))))
  return _stats_from_histograms(hist)
