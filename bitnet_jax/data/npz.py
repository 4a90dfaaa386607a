"""A dataset in one .npz file: `x_train`, `y_train`, `x_test`, `y_test`.

Images are uint8 (N, H, W) or (N, H, W, C) with C in {1, 3}, used at their stored size; labels
are non-negative integers, and `num_classes` = largest label + 1.
"""

import zipfile

import numpy as np

from bitnet_jax import errors
from bitnet_jax.data import source

_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read(path: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
  """Reads both splits from the .npz file `path`.

  Returns:
    ({split: (images uint8 (N, H, W, C), labels int32 (N,))}, num_classes).

  Raises:
    errors.DataNotFound: if there is no file at `path`.
    errors.DataError: if it is not an .npz archive, or its arrays are missing or malformed.
  """
  source.check_exists(path, "npz file (data_dir)")
  try:
    with np.load(path, allow_pickle=False) as npz:
      if not isinstance(npz, np.lib.npyio.NpzFile):
        raise errors.DataError("a single .npy array, not an .npz archive")
      missing = [k for k in _KEYS if k not in npz.files]
      if missing:
        raise errors.DataError(f"missing arrays {missing} (found {npz.files}); expected "
                               f"{list(_KEYS)}")
      arrays = {k: npz[k] for k in _KEYS}
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise errors.DataError(f"Cannot read npz file {path}: {e}.") from e
  splits = {}
  for split in source.SPLITS:
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim == 3:
      x = x[..., None]  # (N, H, W) -> (N, H, W, 1)
    source.check_images(x, f"{path} x_{split}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      raise errors.DataError(f"{path}: y_{split} must be a 1-D integer array, found shape "
                             f"{y.shape} dtype {y.dtype}.")
    if len(y) != len(x):
      raise errors.DataError(f"{path}: x_{split} has {len(x)} images but y_{split} has "
                             f"{len(y)} labels.")
    if y.size and y.min() < 0:
      raise errors.DataError(f"{path}: y_{split} labels must be >= 0, found {y.min()}.")
    splits[split] = (x, y.astype(np.int32))
  num_classes = int(max(y.max(initial=0) for _, y in splits.values())) + 1
  return splits, num_classes
