"""What every reader yields: a `Source` per split, its `DatasetInfo`, and the checks they share.

A *source* is one split ('train', 'test') of a dataset: an object with `len(source)`,
`source[i] -> {'image', 'label'}` (grain's random-access protocol) and
`source.read(ids) -> (images uint8 (b, H, W, C), labels int32 (b,))`, a vectorised read that the
pipeline (`pipeline.py`) calls once per batch. Its `DatasetInfo` says the number of classes, the
image shape, split sizes and the normalisation statistics.
"""

import dataclasses
import os
from typing import Any, Protocol

import numpy as np

from bitnet_jax import errors

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the trainer need to know about a dataset.

  Attributes:
    name: the dataset's name (`DataSpec.name`, i.e. config.dataset).
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
    check_split(split)
    return self.num_train if split == "train" else self.num_test


class Source(Protocol):
  """A random-access split: what the pipeline reads."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...

  def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns images uint8 (b, H, W, C) and labels int32 (b,) of examples `ids` (b,)."""
    ...


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


# ------------------------------------------------------------------------------------------
# Checks.


def check_split(split: str) -> None:
  """Raises ValueError unless `split` is one of `SPLITS`."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")


def check_images(images: np.ndarray, where: str, channels: int | None = None) -> None:
  """Checks uint8 (N, H, W, C) with C in {1, 3} (or == `channels`).

  Raises:
    errors.DataError: naming `where`, what was expected and what was found.
  """
  if images.dtype != np.uint8:
    raise errors.DataError(f"{where}: images must be uint8, found {images.dtype}.")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.DataError(f"{where}: images must have shape (N, H, W) or (N, H, W, C) with C "
                           f"in {{1, 3}}, found {images.shape}.")
  if channels is not None and images.shape[-1] != channels:
    raise errors.DataError(f"{where}: expected {channels} channel(s), found {images.shape}.")


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Checks that every label is in [0, num_classes) (errors.DataError otherwise)."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise errors.DataError(f"{where}: labels must be in [0, {num_classes}), found "
                           f"[{labels.min()}, {labels.max()}].")


def check_exists(path: str, what: str) -> None:
  """Raises errors.DataNotFound, naming `what`, if `path` does not exist."""
  if not os.path.exists(path):
    raise errors.DataNotFound(f"{what} not found: {path}")


# ------------------------------------------------------------------------------------------
# Exact channel statistics.


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Exact per-channel mean and std of uint8 images (N, H, W, C), on the 0..1 scale."""
  return stats_from_histograms(histograms(images))


def histograms(images: np.ndarray) -> np.ndarray:
  """Per-channel byte histograms (C, 256) of uint8 images (N, H, W, C)."""
  return np.stack([np.bincount(images[..., c].ravel(), minlength=256)
                   for c in range(images.shape[-1])])


def stats_from_histograms(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) on the 0..1 scale from byte histograms (C, 256)."""
  values = np.arange(256, dtype=np.float64) / 255.0
  count = hist.sum(axis=1)  # (C,)
  mean = hist @ values / count
  var = hist @ values**2 / count - mean**2
  return (tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(np.maximum(var, 0))))
