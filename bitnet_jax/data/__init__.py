"""The data: datasets by name, one reader per format, and the input pipeline.

  spec = data.DataSpec("cifar10", data_dir=...)          # what to read (the config's fields)
  info = data.get_dataset_info(spec)                      # classes, image shape, sizes, mean/std
  it = data.train_iter(data.get_source(spec, "train"), info, batch_size=128, seed=0)

Rooms: `registry` (DataSpec, which reader serves a dataset), `source` (DatasetInfo, the Source
protocol, shared checks), the readers `cifar`, `idx`, `tiny_imagenet`, `npz`, `synthetic`,
`tfds`, the `pipeline` (batches, augmentation, normalisation) and `prepare` (TFDS
preparation; its command is `python -m bitnet_jax.cli.prepare`). Nothing here reads a config:
`run_config` turns a config's fields into these arguments.
"""

from bitnet_jax.data.pipeline import (AUGMENTATIONS, crop_flip, eval_iter, normalize,
                                      num_eval_batches, num_examples, steps_per_epoch,
                                      train_iter)
from bitnet_jax.data.registry import DATASETS, DataSpec, get_dataset_info, get_source
from bitnet_jax.data.source import SPLITS, DatasetInfo, Source
from bitnet_jax.data.tfds import tfds_prepared

__all__ = [
    "AUGMENTATIONS", "DATASETS", "SPLITS", "DataSpec", "DatasetInfo", "Source", "crop_flip",
    "eval_iter", "get_dataset_info", "get_source", "normalize", "num_eval_batches",
    "num_examples", "steps_per_epoch", "tfds_prepared", "train_iter",
]
