"""Tiny-ImageNet-200: the extracted `tiny-imagenet-200/` folder of JPEGs.

The 110k JPEGs are listed at start-up (cheap) and decoded lazily, per record, with PIL;
grayscale JPEGs are converted to RGB. Classes are numbered in the order of `wnids.txt`. The
'test' split is the labelled `val/` folder (`val/val_annotations.txt` gives its labels).
"""

import functools
import os
from typing import Any, Sequence

import numpy as np

from bitnet_jax import errors
from bitnet_jax.data import source

MEAN = (0.4802, 0.4481, 0.3975)  # the release's normalisation
STD = (0.2302, 0.2265, 0.2262)
NUM_CLASSES = 200
IMAGE_SHAPE = (64, 64, 3)


class ImageFileSource:
  """Image files decoded with PIL when read."""

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
      raise errors.DataError(f"Image {path} has shape {image.shape}, expected "
                             f"{self.image_shape}.")
    return image


def find_root(data_dir: str) -> str:
  """The `tiny-imagenet-200/` folder: `data_dir` itself or its subfolder of that name.

  Raises:
    errors.DataNotFound: if neither holds wnids.txt.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  for root in (data_dir, os.path.join(data_dir, "tiny-imagenet-200")):
    if os.path.isfile(os.path.join(root, "wnids.txt")):
      return root
  raise errors.DataNotFound(f"No Tiny-ImageNet folder at {data_dir}: expected wnids.txt, train/ "
                            "and val/ in it or in its tiny-imagenet-200/ subfolder.")


@functools.lru_cache(maxsize=2)
def sources(root: str) -> dict[str, ImageFileSource]:
  """Lists Tiny-ImageNet's files under `root` (see `find_root`): {'train': ..., 'test': val/}.

  Raises:
    errors.DataError, errors.DataNotFound: on a bad annotation line, or missing folders/images.
  """
  with open(os.path.join(root, "wnids.txt")) as f:
    wnids = [line.strip() for line in f if line.strip()]
  if len(wnids) != len(set(wnids)):
    raise errors.DataError(f"{root}/wnids.txt lists a class twice.")
  index = {wnid: i for i, wnid in enumerate(wnids)}
  paths, labels = [], []
  for wnid in wnids:
    folder = os.path.join(root, "train", wnid, "images")
    source.check_exists(folder, f"Tiny-ImageNet training folder of class {wnid}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpeg", ".jpg")))
    if not names:
      raise errors.DataNotFound(f"No JPEG files in {folder}.")
    paths += [os.path.join(folder, n) for n in names]
    labels += [index[wnid]] * len(names)
  train = ImageFileSource(paths, np.asarray(labels, np.int32), IMAGE_SHAPE)

  annotations = os.path.join(root, "val", "val_annotations.txt")
  source.check_exists(annotations, "Tiny-ImageNet val/val_annotations.txt")
  paths, labels = [], []
  with open(annotations) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) < 2 or fields[1] not in index:
        raise errors.DataError(f'{annotations} line {line_number}: expected "<file>\\t<wnid>\\t'
                               f'..." with a wnid from wnids.txt, found {line.strip()!r}.')
      paths.append(os.path.join(root, "val", "images", fields[0]))
      labels.append(index[fields[1]])
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise errors.DataNotFound(f"{len(missing)} images listed in {annotations} are missing, e.g. "
                              f"{missing[0]}.")
  test = ImageFileSource(paths, np.asarray(labels, np.int32), IMAGE_SHAPE)
  return {"train": train, "test": test}
