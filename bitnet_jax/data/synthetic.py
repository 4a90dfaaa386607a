"""Synthetic data for smoke runs: seeded, class-dependent images that a model can learn.

Each class is a noisy copy of its own random low-frequency pattern (4x4, upsampled). The data
depend only on the sizes (`DataSpec.synthetic_*`), not on the run's seed.
"""

import numpy as np

from bitnet_jax import errors


def make(num_train: int, num_test: int, num_classes: int,
         image_shape: tuple[int, ...]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
  """Class-dependent random images: class prototype (4x4 pattern, upsampled) + noise.

  Args:
    num_train: training examples (>= 1).
    num_test: test examples (>= 1).
    num_classes: classes (>= 2); each split is balanced over them.
    image_shape: (H, W, C), C in {1, 3}.

  Returns:
    ({split: (images uint8 (N, H, W, C), labels int32 (N,))}, num_classes).

  Raises:
    errors.ConfigError: on sizes out of range.
  """
  if len(image_shape) != 3 or image_shape[-1] not in (1, 3) or min(image_shape) < 1:
    raise errors.ConfigError(f"synthetic_image_shape must be (H, W, C) with C in {{1, 3}}, found "
                             f"{image_shape}.")
  if num_train < 1 or num_test < 1 or num_classes < 2:
    raise errors.ConfigError("synthetic_num_train/num_test must be >= 1 and "
                             f"synthetic_num_classes >= 2, found {num_train}, {num_test}, "
                             f"{num_classes}.")
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
