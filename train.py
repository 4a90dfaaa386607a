"""Trains a BITnet: `python train.py --config configs/quickstart.py [--workdir DIR] [--steps N]`.

Thin entry point: the logic lives in `bitnet_jax.trainer` so it can be imported in Colab.
  --config.<field>=<value>  overrides any config field (unknown fields are rejected);
  --steps N                 time steps T at evaluation (the periodic validation): shorthand for
                            --config.eval_time_steps=N, and wins over it if both are given.
                            The training time steps are --config.time_steps.
  --workdir DIR             checkpoints, metrics.jsonl and TensorBoard files; rerunning with the
                            same workdir resumes. Default: workdirs/<config file name>.
  --distributed             call jax.distributed.initialize() first (multi-process runs: several
                            GPUs, hosts or a TPU pod slice); under SLURM or on Cloud TPU, JAX
                            finds the job by itself.
  --coordinator_address H:P, --num_processes N, --process_id I
                            the job without a scheduler (imply --distributed): process I of N,
                            process 0 listening at H:P. --distributed_timeout_s S bounds the
                            wait for the others (default 300).
  --verbose                 expected errors (a mistyped field, missing data, ...) print one line,
                            `error: ...`, and exit with status 2 (usage) or 1; --verbose (or
                            BITNET_JAX_VERBOSE=1) shows their traceback too.
"""

import os
import shlex
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from bitnet_jax import errors
from bitnet_jax.cli import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default workdirs/<config name>.")
_STEPS = flags.DEFINE_integer("steps", None, "Time steps at evaluation (overrides "
                              "config.eval_time_steps).")
runner.define_distributed_flags()  # --distributed, --coordinator_address, ...


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags start with --)")
  if _STEPS.value is not None and _STEPS.value < 1:
    raise errors.UsageError(f"--steps must be >= 1, got {_STEPS.value} (it is T at evaluation; "
                            "--config.max_train_steps limits training)")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  import jax  # pylint: disable=import-outside-toplevel
  from bitnet_jax import trainer  # pylint: disable=import-outside-toplevel
  runner.initialize_distributed()
  config = _CONFIG.value
  if _STEPS.value is not None:
    with config.unlocked():
      config.eval_time_steps = _STEPS.value
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or os.path.join("workdirs", name)
  result = trainer.train_and_evaluate(config, workdir)
  if result.get("preempted") and jax.process_index() == 0:
    again = sys.argv if _WORKDIR.value else sys.argv + ["--workdir", workdir]
    print("resume with: " + shlex.join(["python", *again]), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  runner.run(main, _CONFIG)
