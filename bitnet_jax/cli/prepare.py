"""Prepares a TFDS dataset as ArrayRecord files, the format that training reads.

  python -m bitnet_jax.cli.prepare cifar10|cifar100|mnist|fashion_mnist [--data_dir DIR]
      [--overwrite]

  --data_dir DIR  the TFDS data dir (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets); give
                  training the same folder as --config.data_dir.
  --overwrite     replace a preparation in another file format (TFRecord, e.g. left by
                  tfds.load); the downloads are kept.

Preparing downloads the dataset and runs TFDS's builder, which needs TensorFlow, in a child
process without accelerators (`bitnet_jax/data/prepare.py` says how and why). A dataset already
prepared as ArrayRecord is left as it is.
"""

from absl import flags

from bitnet_jax import errors
from bitnet_jax.cli import runner
from bitnet_jax.data import prepare

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or "
                                "~/tensorflow_datasets).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a preparation in another format "
                               "(TFRecord).")
_CHILD = flags.DEFINE_bool("child", False, "Internal: be the child process that runs TFDS's "
                           "builder.")


def main(argv):
  if len(argv) != 2:
    raise errors.UsageError(f"expected one dataset name, one of {', '.join(prepare.NAMES)}; "
                            f"got {' '.join(argv[1:]) or 'none'}",
                            hint="e.g. python -m bitnet_jax.cli.prepare cifar10 --data_dir DIR")
  name = argv[1]
  if _CHILD.value:
    prepare.child(name, _DATA_DIR.value)
    return
  try:
    prepare.prepare(name, _DATA_DIR.value, overwrite=_OVERWRITE.value)
  except ValueError as e:  # an unknown name
    raise errors.UsageError(str(e)) from e
  except (FileExistsError, ModuleNotFoundError, RuntimeError) as e:  # the message says what to do
    raise errors.UserError(str(e)) from e


if __name__ == "__main__":
  runner.run(main)
