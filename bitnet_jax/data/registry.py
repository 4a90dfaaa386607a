"""The datasets by name: which reader serves a `DataSpec`, its `DatasetInfo` and its sources.

`DataSpec.name` selects the dataset; `DataSpec.data_dir` where it is read from:

* `cifar10`, `cifar100`, `fashion_mnist`, `mnist`:
  - **local files** when `data_dir` holds the dataset in its distributed form: CIFAR python
    pickles (`cifar.py`) or the MNIST-family IDX files (`idx.py`). If only some of those files
    are there, that is an error (naming the missing ones), not a silent switch to TFDS.
  - **TFDS** otherwise (`tfds.py`), with `data_dir` as the TFDS data dir ('' or None: TFDS's
    default), where the dataset must be prepared as ArrayRecord (`prepare.py`).
* `tiny_imagenet`: the extracted `tiny-imagenet-200/` folder or its parent (`tiny_imagenet.py`).
* `npz`: `data_dir` is the path of one .npz file (`npz.py`).
* `synthetic`: seeded, class-dependent images of the `synthetic_*` sizes (`synthetic.py`).

The 28x28 MNIST-family images are zero-padded to 32x32 (2 pixels each side, on uint8) and keep
one channel. Mean/std are the release's values for CIFAR-10/100 and Tiny-ImageNet; for the
other datasets they are computed, exactly (from per-channel byte histograms), on the training
split's original pixels, i.e. *before* the MNIST padding, so they match the usual published
values (MNIST 0.1307/0.3081, Fashion-MNIST 0.2860/0.3530).
"""

import dataclasses
import functools
import os

from bitnet_jax import errors
from bitnet_jax.data import cifar
from bitnet_jax.data import idx
from bitnet_jax.data import npz
from bitnet_jax.data import source
from bitnet_jax.data import synthetic
from bitnet_jax.data import tfds
from bitnet_jax.data import tiny_imagenet

DATASETS = (*tfds.NAMES, "tiny_imagenet", "npz", "synthetic")
_NEEDS_DATA_DIR = {
    "tiny_imagenet": "the extracted tiny-imagenet-200/ folder (or its parent)",
    "npz": "path of a .npz file with x_train, y_train, x_test, y_test"}


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which dataset to read and where from: the data package's one description of a dataset.

  The fields are the config's (`dataset` is `name`); configs/default.py documents them.

  Attributes:
    name: one of `DATASETS`.
    data_dir: local files, a TFDS data dir, a Tiny-ImageNet folder or an .npz path; '' or None:
      TFDS's default data dir.
    synthetic_num_train: 'synthetic' only: training examples.
    synthetic_num_test: 'synthetic' only: test examples.
    synthetic_num_classes: 'synthetic' only: classes.
    synthetic_image_shape: 'synthetic' only: (H, W, C), C in {1, 3}.

  Raises:
    errors.ConfigError: on an unknown name, or a missing data_dir where one is needed.
  """
  name: str
  data_dir: str | None = None
  synthetic_num_train: int = 1024
  synthetic_num_test: int = 256
  synthetic_num_classes: int = 10
  synthetic_image_shape: tuple[int, int, int] = (32, 32, 3)

  def __post_init__(self):
    if self.name not in DATASETS:
      raise errors.ConfigError(f"Unknown dataset {self.name!r}; valid config.dataset values: "
                               f'{", ".join(DATASETS)}.')
    if self.name in _NEEDS_DATA_DIR and not self.data_dir:
      raise errors.ConfigError(f"dataset {self.name!r} needs config.data_dir = "
                               f"{_NEEDS_DATA_DIR[self.name]}.")
    object.__setattr__(self, "data_dir", self.data_dir or None)
    object.__setattr__(self, "synthetic_image_shape", tuple(self.synthetic_image_shape))


def get_dataset_info(spec: DataSpec) -> source.DatasetInfo:
  """Describes the dataset of `spec` without decoding images that are not already in memory.

  Local CIFAR/IDX/npz/synthetic data are loaded (and cached for this process, so the sources
  reuse them); TFDS and Tiny-ImageNet only open or list files, except that the MNIST family
  through TFDS reads its training split once to compute mean/std.
  """
  if spec.name in tfds.NAMES and _local_dir(spec) is None:
    return tfds.dataset_info(spec.name, spec.data_dir)
  if spec.name == "tiny_imagenet":
    train, test = (get_source(spec, s) for s in source.SPLITS)
    return source.DatasetInfo(spec.name, tiny_imagenet.NUM_CLASSES, train.image_shape,
                              len(train), len(test), tiny_imagenet.MEAN, tiny_imagenet.STD)
  return _load_in_memory(*_memory_key(spec)).info


def get_source(spec: DataSpec, split: str) -> source.Source:
  """Opens split `split` ('train' or 'test') of the dataset of `spec` for random access.

  Args:
    spec: the dataset.
    split: 'train' or 'test' (Tiny-ImageNet: 'test' is the labelled val/ folder).

  Returns:
    A `Source` whose `read` yields uint8 (b, H, W, C) images and int32 (b,) labels.
  """
  source.check_split(split)
  if spec.name in tfds.NAMES and _local_dir(spec) is None:
    return tfds.open_split(spec.name, split, spec.data_dir)
  if spec.name == "tiny_imagenet":
    return tiny_imagenet.sources(tiny_imagenet.find_root(spec.data_dir))[split]
  return _load_in_memory(*_memory_key(spec)).sources[split]


# ------------------------------------------------------------------------------------------
# Local files in their distributed form: detection.


def _local_dir(spec: DataSpec) -> str | None:
  """The folder holding local files of a CIFAR/MNIST-family dataset, or None (-> TFDS).

  Raises:
    errors.DataNotFound: if `data_dir` does not exist, or holds only part of the files.
  """
  if not spec.data_dir:
    return None
  data_dir = os.path.abspath(os.path.expanduser(spec.data_dir))
  is_cifar = spec.name in cifar.NAMES
  if not os.path.isdir(data_dir):
    local = cifar.local_files(spec.name) if is_cifar else idx.local_files()
    raise errors.DataNotFound(
        f"config.data_dir does not exist or is not a folder: {data_dir}. Point it at the "
        f'local files of {spec.name!r} ({", ".join(local)}) or at a TFDS data dir '
        "(create it first for a TFDS download), or leave it empty for the default TFDS dir.")
  return cifar.find(spec.name, data_dir) if is_cifar else idx.find(spec.name, data_dir)


# ------------------------------------------------------------------------------------------
# Datasets held in memory (local CIFAR / IDX files, npz, synthetic), cached per process.


@dataclasses.dataclass(frozen=True)
class _InMemory:
  info: source.DatasetInfo
  sources: dict[str, source.ArraySource]


def _memory_key(spec: DataSpec) -> tuple:
  """The part of `spec` that determines an in-memory dataset (the cache's key)."""
  if spec.name == "synthetic":
    return spec.name, None, (spec.synthetic_num_train, spec.synthetic_num_test,
                             spec.synthetic_num_classes, spec.synthetic_image_shape)
  if spec.name == "npz":
    return spec.name, os.path.abspath(os.path.expanduser(spec.data_dir)), None
  return spec.name, _local_dir(spec), None


@functools.lru_cache(maxsize=2)
def _load_in_memory(name: str, path: str | None, sizes: tuple | None) -> _InMemory:
  """Loads both splits; cached so that the info and the sources share one copy."""
  if name == "synthetic":
    splits, num_classes = synthetic.make(*sizes)
  elif name == "npz":
    splits, num_classes = npz.read(path)
  elif name in idx.NAMES:
    splits, num_classes = idx.read(path), idx.NUM_CLASSES
  else:
    splits, num_classes = cifar.read(name, path), cifar.NUM_CLASSES[name]
  for split, (images, labels) in splits.items():
    where = f"{name} {split} split ({path})" if path else f"{name} {split} split"
    source.check_images(images, where)
    source.check_labels(labels, num_classes, where)
  if name in cifar.NAMES:
    mean, std = cifar.MEAN, cifar.STD
  else:
    mean, std = source.channel_stats(splits["train"][0])  # before any padding
  if name in idx.NAMES:
    splits = {s: (idx.pad_28_to_32(x), y) for s, (x, y) in splits.items()}
  train, test = splits["train"], splits["test"]
  if train[0].shape[1:] != test[0].shape[1:]:
    raise errors.DataError(f"{name}: train images {train[0].shape[1:]} and test images "
                           f"{test[0].shape[1:]} differ in shape ({path}).")
  info = source.DatasetInfo(name, num_classes, tuple(train[0].shape[1:]), len(train[1]),
                            len(test[1]), mean, std)
  return _InMemory(info, {s: source.ArraySource(x, y) for s, (x, y) in splits.items()})
