"""Writes a training workdir's weights as a checkpoint of the original PyTorch release.

  python -m bitnet_jax.cli.export --config configs/cifar10.py --workdir workdirs/cifar10 \\
      --out model.ckpt [--which latest|best] [--checkpoint_step K]

The file is a PyTorch Lightning ``.ckpt`` in the release's layout, written without PyTorch
(`bitnet_jax.interop.export`): the release's own code can evaluate it, and
`eval.py --torch_checkpoint` reads it back. `--which` / `--checkpoint_step` choose the
checkpoint of the workdir as in eval.py; the config must be the one the run was trained with.
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from bitnet_jax import errors
from bitnet_jax.cli import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding orbax checkpoints.")
_OUT = flags.DEFINE_string("out", None, "The .ckpt file to write.")
_WHICH = flags.DEFINE_enum("which", "latest", ["best", "latest"], "Checkpoint of the workdir.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Export this step of the workdir.")


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags start with --)")
  logging.set_verbosity(logging.WARNING)
  from bitnet_jax.interop import export  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  meta = export.export_workdir(
      _WORKDIR.value, _OUT.value, variant=config.variant, fs=config.fs, dataset=config.dataset,
      time_steps=config.time_steps, eval_time_steps=config.eval_time_steps, which=_WHICH.value,
      checkpoint_step=_STEP.value)
  arch = meta["arch"]
  print(f"wrote {_OUT.value}: {arch['variant']} fs={arch['fs']:g}, {arch['num_classes']} "
        f"classes, step {meta['step']} of {meta['source']} (the release's layout; read it with "
        f"eval.py --torch_checkpoint or the release's PyTorch code)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir", "out"])
  runner.run(main, _CONFIG)
