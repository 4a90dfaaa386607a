"""CIFAR-10/100 and the MNIST family through TFDS, read from ArrayRecord files.

With `data_dir` as the TFDS data dir ('' or None: TFDS's default, $TFDS_DATA_DIR or
~/tensorflow_datasets), in any folder: the dataset must be prepared there as ArrayRecord, the
TFDS format with random access, once, by `python -m bitnet_jax.cli.prepare <name> --data_dir
<dir>` (`prepare.py`: it downloads and runs TFDS's builder, which needs TensorFlow, in a child
process). Reading opens the array_record files (`builder.as_data_source`) and decodes records
per batch: nothing is loaded up front, nothing is downloaded or prepared, and TensorFlow is
never imported. A missing preparation, or one in TFRecord (what `tfds.load` writes), is an
error that names what was found and the command to run.
"""

import json
import shlex
from typing import Any, Sequence

import numpy as np

from bitnet_jax import errors
from bitnet_jax.data import cifar
from bitnet_jax.data import idx
from bitnet_jax.data import source

NAMES = cifar.NAMES + idx.NAMES  # the datasets read through TFDS (and prepared by prepare.py)
_FORMAT = "array_record"  # the one TFDS file format with random access that we read


class TfdsSource:
  """A TFDS array_record data source, read and decoded record by record."""

  def __init__(self, data_source: Sequence[dict[str, Any]], name: str, split: str):
    self._source = data_source
    self._name = name
    self._split = split
    self._num_classes, self._image_shape = _facts(name)
    self._pad = name in idx.NAMES

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
    source.check_images(images, where, channels=self._image_shape[-1])
    source.check_labels(labels, self._num_classes, where)
    if self._pad:
      images = idx.pad_28_to_32(images)
    return images, labels


def dataset_info(name: str, data_dir: str | None) -> source.DatasetInfo:
  """Describes `name` prepared in `data_dir`; only the MNIST family reads its training split
  (once, in chunks, to compute mean/std on the original 28x28 pixels)."""
  train, test = (open_split(name, s, data_dir) for s in source.SPLITS)
  if name in cifar.NAMES:
    mean, std = cifar.MEAN, cifar.STD
  else:
    mean, std = _stats_in_chunks(train)
  num_classes, image_shape = _facts(name)
  return source.DatasetInfo(name, num_classes, image_shape, len(train), len(test), mean, std)


def tfds_prepared(name: str, data_dir: str | None) -> tuple[str, tuple[str, ...]]:
  """Where TFDS keeps `name` in `data_dir`, and the file formats prepared there.

  Args:
    name: one of `NAMES`.
    data_dir: the TFDS data dir; '' or None: TFDS's default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).

  Returns:
    (the version folder `<data_dir>/<name>/<version>`, the file formats its dataset_info.json
    lists, e.g. ('array_record',) or ('tfrecord',); () when nothing is prepared there).
  """
  builder = _builder(name, data_dir or None)
  info_file = builder.data_path / "dataset_info.json"  # an etils epath: local or gs://
  if not info_file.exists():  # no finished preparation (TFDS renames the folder at the end)
    return str(builder.data_path), ()
  info = json.loads(info_file.read_text())
  formats = [info.get("fileFormat") or "tfrecord"] + list(info.get("alternativeFileFormats", []))
  return str(builder.data_path), tuple(dict.fromkeys(formats))


def prepare_command(name: str, data_dir: str | None, overwrite: bool = False) -> str:
  """The shell command that prepares `name` in `data_dir` (for messages)."""
  cmd = f"python -m bitnet_jax.cli.prepare {name}"
  if data_dir:
    cmd += f" --data_dir {shlex.quote(data_dir)}"
  return cmd + (" --overwrite" if overwrite else "")


def open_split(name: str, split: str, data_dir: str | None) -> TfdsSource:
  """Opens split `split` of `name`, prepared as ArrayRecord in `data_dir`; never prepares it.

  Raises:
    errors.DataNotFound: if `name` is not prepared as ArrayRecord there; the message says what
      was found and the command that prepares it.
  """
  builder = _builder(name, data_dir or None)
  try:
    data_source = builder.as_data_source(split=split, file_format=_FORMAT)
  except Exception as e:  # pylint: disable=broad-except; TFDS raises many kinds here
    path, formats = tfds_prepared(name, data_dir)
    root = str(builder.data_dir_root)
    local = cifar.local_files(name) if name in cifar.NAMES else idx.local_files()
    if not formats:
      raise errors.DataNotFound(
          f"TFDS dataset {name!r} is not prepared in {root} (no {path}/dataset_info.json). "
          f"Prepare it once (this downloads it, and needs TensorFlow in that step only):\n"
          f"  {prepare_command(name, root)}\n"
          "Or download the original files and set config.data_dir to the folder holding them: "
          f'{", ".join(local)}.') from e
    if _FORMAT not in formats:
      raise errors.DataNotFound(
          f"{path} holds a {'/'.join(formats)} preparation of TFDS dataset {name!r} (e.g. left "
          f"by tfds.load), not ArrayRecord, the format read here. Replace it:\n"
          f"  {prepare_command(name, root, overwrite=True)}") from e
    raise errors.DataNotFound(f"TFDS cannot open split {split!r} of the ArrayRecord files of "
                              f"{name!r} in {path}: {type(e).__name__}: {e}") from e
  return TfdsSource(data_source, name, split)


def _facts(name: str) -> tuple[int, tuple[int, int, int]]:
  """(num_classes, image shape as yielded) of one of `NAMES`."""
  if name in cifar.NAMES:
    return cifar.NUM_CLASSES[name], cifar.IMAGE_SHAPE
  return idx.NUM_CLASSES, idx.IMAGE_SHAPE


def _builder(name: str, data_dir: str | None):
  """TFDS's builder of `name` in `data_dir` (None: TFDS's default).

  Its file format is the one of the preparation found there (dataset_info.json), if any.
  Building it neither downloads, prepares nor imports TensorFlow.
  """
  import tensorflow_datasets  # pylint: disable=import-outside-toplevel
  return tensorflow_datasets.builder(name, data_dir=data_dir)


def _stats_in_chunks(split: TfdsSource, chunk: int = 4096):
  """Mean/std of a TFDS training split, read in chunks, before any padding."""
  hist = 0
  for start in range(0, len(split), chunk):
    ids = np.arange(start, min(len(split), start + chunk))
    hist = hist + source.histograms(split.read_raw(ids))
  return source.stats_from_histograms(hist)
