"""Plots a training workdir's curve as a PNG.

  python -m bitnet_jax.cli.plots WORKDIR [--out PNG] [--title TEXT]   # default WORKDIR/training.png
"""

import os

from absl import flags

from bitnet_jax import errors
from bitnet_jax import plots
from bitnet_jax.cli import runner

_OUT = flags.DEFINE_string("out", "", "PNG path; default WORKDIR/training.png.")
_TITLE = flags.DEFINE_string("title", "", "The plot's title.")


def main(argv):
  if len(argv) != 2:
    raise errors.UsageError(f"expected one training workdir, got {' '.join(argv[1:]) or 'none'}",
                            hint="e.g. python -m bitnet_jax.cli.plots workdirs/quickstart")
  workdir = argv[1]
  out = _OUT.value or os.path.join(workdir, "training.png")
  try:
    rows = plots.read_metrics(workdir)
  except FileNotFoundError as e:
    raise errors.CheckpointError(str(e)) from None
  plots.plot_training(rows, out, _TITLE.value)
  print(out)


if __name__ == "__main__":
  runner.run(main)
